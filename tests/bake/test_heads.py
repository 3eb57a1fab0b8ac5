"""Squash prunes whole attention heads: a mask on an attention output projection's input
that removes whole heads (whole key/value groups with grouped-query attention) takes
their rows out of the query, key and value projections, and the model computes what the
``mul`` squash computes; a mask that splits a head is squashed as before."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from actsparse_deploy.bake.plan import Because, Reason, plan_squash
from actsparse_deploy.bake.squash import squash
from actsparse_deploy.calibration.masks import LayerMask, Masks


def _batch(vocab: int = 50) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": torch.randint(0, vocab, (2, 8)), "attention_mask": mask}


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=50)
    return transformers.BertModel(config).eval()


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=64,
                                      num_hidden_layers=2, vocab_size=50, use_cache=False)
    return transformers.LlamaForCausalLM(config).eval()


def _masks(name: str, vector: torch.Tensor) -> Masks:
    return Masks({name: LayerMask(vector, input_shape=(8, vector.numel()))})


def _outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("mode", ["prune", "auto"])
def test_whole_bert_heads_leave_query_key_and_value_with_the_rest(mode):
    model, batch = _bert(), _batch()
    vector = torch.ones(32)
    vector[8:16] = 0  # head 1
    vector[24:32] = 0  # head 3
    masks = _masks("encoder.layer.1.attention.output.dense", vector)
    want = _outputs(squash(copy.deepcopy(model), masks, "mul").model, batch)
    result = squash(model, masks, mode, example=batch)
    model = result.model
    attention = model.encoder.layer[1].attention
    assert [attention.self.query.out_features, attention.self.key.out_features, attention.self.value.out_features] == [16, 16, 16]
    assert attention.output.dense.in_features == 16
    assert result.modes == {"encoder.layer.1.attention.output.dense": "prune"}
    assert result.reasons["encoder.layer.1.attention.output.dense"].startswith("removed 2 of 4 attention heads (16 of 32 features)")
    torch.testing.assert_close(_outputs(model, batch), want, atol=1e-5, rtol=1e-4)


def test_grouped_query_attention_loses_whole_key_value_groups():
    model, batch = _llama(), _batch()
    vector = torch.ones(64)
    vector[:32] = 0  # the first group: query heads 0-3, key/value head 0
    masks = _masks("model.layers.0.self_attn.o_proj", vector)
    want = _outputs(squash(copy.deepcopy(model), masks, "mul").model, batch)
    model = squash(model, masks, "prune", example=batch).model
    attention = model.model.layers[0].self_attn
    assert [attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features] == [32, 8, 8]
    torch.testing.assert_close(_outputs(model, batch), want, atol=1e-5, rtol=1e-4)


def test_a_mask_that_splits_a_head_is_not_pruned_as_heads():
    model, batch = _llama(), _batch()
    vector = torch.ones(64)
    vector[:8] = 0  # one query head of a group of four: its key/value head stays
    plan = plan_squash(model, _masks("model.layers.0.self_attn.o_proj", vector), "prune", example=batch)
    layer = plan.layers["model.layers.0.self_attn.o_proj"]
    assert layer.reason is Reason.GATHERED and layer.heads is None
    assert plan_squash(model, _masks("model.layers.0.self_attn.o_proj", vector), "auto", example=batch).layers[
        "model.layers.0.self_attn.o_proj"].mode == "fold"


def test_every_head_masked_keeps_one_zeroed_so_no_tensor_is_empty():
    model, batch = _bert(), _batch()
    masks = _masks("encoder.layer.0.attention.output.dense", torch.zeros(32))
    want = _outputs(squash(copy.deepcopy(model), masks, "mul").model, batch)
    plan = plan_squash(model, masks, "prune", example=batch)
    layer = plan.layers["encoder.layer.0.attention.output.dense"]
    assert (layer.reason, layer.because, layer.kept.tolist()) == (Reason.HEADS, Because.EMPTY, list(range(8)))
    result = squash(model, masks, "prune", example=batch)
    model = result.model
    assert "one group stays, zeroed in the weight" in result.reasons["encoder.layer.0.attention.output.dense"]
    assert model.encoder.layer[0].attention.self.query.out_features == 8
    torch.testing.assert_close(_outputs(model, batch), want, atol=1e-5, rtol=1e-4)


class _FixedHeads(torch.nn.Module):
    """Attention whose code reshapes by its own head count, not the tensors': it cannot lose heads."""

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(width, width) for _ in range(3))
        self.o_proj = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def test_auto_folds_heads_the_models_code_cannot_lose_and_prune_says_why():
    from actsparse_deploy.base.errors import SquashError

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("attn", _FixedHeads())
    example = torch.randn(2, 5, 16)
    vector = torch.ones(16)
    vector[4:8] = 0  # head 1, whole
    masks = Masks({"attn.o_proj": LayerMask(vector, input_shape=(5, 16))})
    want = squash(model, masks, "mul").model(example)
    result = squash(model, masks, "auto", example=example)
    assert result.modes == {"attn.o_proj": "fold"}
    assert "removes whole attention heads, but the model does not compute the same without them" in result.reasons["attn.o_proj"]
    torch.testing.assert_close(result.model(example), want)
    with pytest.raises(SquashError, match="fails on check batch 0"):
        squash(model, masks, "prune", example=example)


def test_one_head_count_where_the_config_cannot_say_the_count_folds_or_refuses():
    """A decoder with a cache: its config must say the heads left, and transformers' Llama config takes no head count
    that does not divide the hidden size (64 with 3 of 4 heads): auto folds, prune says why; 2 of 4 is said."""
    from actsparse_deploy.base.errors import SquashError

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                                          num_hidden_layers=2, vocab_size=50, use_cache=False)
        return transformers.LlamaForCausalLM(config).eval()

    def masks(heads: int) -> Masks:
        vector = torch.ones(64)
        vector[: 16 * heads] = 0
        return Masks({f"model.layers.{i}.self_attn.o_proj": LayerMask(vector.clone(), input_shape=(8, 64)) for i in range(2)})

    batch = _batch()
    folded = squash(model(), masks(1), "auto", example=batch, one_head_count=True)
    assert set(folded.modes.values()) == {"fold"} and folded.model.config.num_attention_heads == 4
    reason = folded.reasons["model.layers.0.self_attn.o_proj"]
    assert "keeps one number of attention heads in every layer, which its config says" in reason
    assert "not a multiple of the number of attention heads (3)" in reason
    with pytest.raises(SquashError, match="not a multiple of the number of attention heads"):
        squash(model(), masks(1), "prune", example=batch, one_head_count=True)
    pruned = squash(model(), masks(2), "prune", example=batch, one_head_count=True)
    config = pruned.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 2, 16)
    torch.testing.assert_close(_outputs(pruned.model, batch), _outputs(squash(model(), masks(2), "mul").model, batch))
    uneven = masks(2)
    uneven.layers["model.layers.1.self_attn.o_proj"] = LayerMask(torch.ones(64), input_shape=(8, 64))
    with pytest.raises(SquashError, match="model.layers.1.self_attn.o_proj keeps 4 of 4"):
        squash(model(), uneven, "prune", example=batch, one_head_count=True)
    assert squash(model(), uneven, "prune", example=batch).model.config.num_attention_heads == 4  # no cache: per layer, config as it was
