"""Greedy generation through a decoder with a KV cache, ONNX against PyTorch, and its decode speed
(actsparse_deploy.onnx.generate)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from actsparse_deploy.base.errors import ValidationError
from actsparse_deploy.models.decoder import WithPast, decoder_example
from actsparse_deploy.onnx.export import export_onnx
from actsparse_deploy.onnx.generate import check_generation, decode_latency, held_out_prompts

VOCAB = 256


def _export(lm: nn.Module, folder) -> tuple[str, WithPast]:
    model = WithPast(lm.eval()).eval()
    batch = {"input_ids": torch.randint(3, VOCAB - 6, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    path = str(folder / "decoder.onnx")
    export_onnx(model, decoder_example(batch, model.layout), path, exporter="dynamo", io_spec=model.layout.io_spec())
    return path, model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2))
    return _export(lm, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return _export(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)), tmp_path_factory.mktemp("gpt2"))


def _held_out(rows: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    """Two held-out batches: the first with a left-padded row (never a prompt) and a right-padded one."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 9:] = 0  # right padding: a 9-token prompt
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]


class Drift(nn.Module):
    """The decoder, with ``add`` put on its logits (at ``index``, or everywhere) once more than ``after`` positions are in the mask."""

    def __init__(self, inner: nn.Module, after: int, add: float, index: int | None = None) -> None:
        super().__init__()
        self.inner, self.after, self.add, self.index = inner, after, add, index

    def forward(self, input_ids, attention_mask, position_ids, **past):
        logits, *present = self.inner(input_ids, attention_mask, position_ids, **past)
        if attention_mask.shape[1] > self.after:
            logits = logits.clone()
            if self.index is None:
                logits += self.add
            else:
                logits[..., self.index] += self.add
        return (logits, *present)


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])  # GPT-2's export: the slow tier
def test_the_cached_export_generates_what_pytorch_does(family, request):
    path, model = request.getfixturevalue(family)
    report = check_generation(path, model, _held_out(), prompts=3, new_tokens=32)
    out = report.to_json()
    assert out["passed"] and out["tokens_identical"]
    assert out["prompts"] == 3 and out["new_tokens"] == 32
    assert out["prompt_tokens"] == [9, 12, 12]  # the left-padded row skipped, the right-padded one cut to its tokens
    assert len(out["step_max_abs_diff"]) == 32 and max(out["step_max_abs_diff"]) < 1e-5
    assert out["prefill_max_abs_diff"] < 1e-5
    assert out["max_abs_diff"] == max(out["prefill_max_abs_diff"], *out["step_max_abs_diff"])
    # the loop is transformers' greedy loop (EOS off: neither side stops early)
    lm = model.lm
    for prompt, tokens in zip(out["prompt_ids"], out["tokens"]):
        with torch.no_grad():
            want = lm.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == want[0, len(prompt):].tolist()


def test_a_changed_weight_fails_at_the_prompt(llama):
    path, model = llama
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.lm.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5
    with pytest.raises(ValidationError, match=r"held-out prompt 0 \(9 tokens\).*logits: max abs diff") as e:
        check_generation(path, changed, _held_out())
    assert "\n" not in str(e.value) and e.value.exit_code == 10


def test_a_drift_in_decoding_names_the_step(llama):
    path, model = llama
    with pytest.raises(ValidationError, match=r"held-out prompt 0 \(9 tokens\), new token 5 of 8: logits: max abs diff 0.01") as e:
        check_generation(path, Drift(model, after=9 + 3, add=0.01), _held_out(), new_tokens=8)
    assert "\n" not in str(e.value)


def test_a_different_token_fails_even_within_the_tolerance(llama):
    path, model = llama
    with pytest.raises(ValidationError, match=r"new token 5 of 8: the tokens differ: ONNX chose \d+, PyTorch 0"):
        check_generation(path, Drift(model, after=9 + 3, add=1000.0, index=0), _held_out(), new_tokens=8, atol=1e4)


def test_the_timeout_stops_the_check(llama):
    path, model = llama
    with pytest.raises(ValidationError, match="timed out after"):
        check_generation(path, model, _held_out(), timeout=1e-9)


def test_decode_latency_times_both_decoders(llama):
    path, _ = llama
    prompt = held_out_prompts(_held_out(), 1, max_tokens=None)[0]
    result = decode_latency(path, path, prompt, new_tokens=8, runs=2, warmup=1, threads=1)
    assert result["prompt_tokens"] == 9 and result["new_tokens"] == 8
    assert (result["runs"], result["warmup"], result["threads"]) == (2, 1, 1)
    for side in ("dense", "sparse"):
        assert result[f"{side}_ms_per_token"] > 0 and result[f"{side}_prefill_ms"] > 0
        assert result[f"{side}_tokens_per_s"] == pytest.approx(1000 / result[f"{side}_ms_per_token"])
    assert result["ratio"] == pytest.approx(result["sparse_ms_per_token"] / result["dense_ms_per_token"])


def test_decode_latencies_time_any_number_of_decoders_against_the_first(llama):
    """The frontier's four decoders (dense, int8, sparse, sparse + int8) are timed token by token alike."""
    from actsparse_deploy.onnx.generate import decode_latencies

    path, _ = llama
    prompt = held_out_prompts(_held_out(), 1, max_tokens=None)[0]
    result = decode_latencies({"a": path, "b": path, "c": path}, prompt, new_tokens=4, runs=2, warmup=1, threads=1)
    assert list(result["decoders"]) == ["a", "b", "c"] and result["new_tokens"] == 4 and result["prompt_tokens"] == 9
    first = result["decoders"]["a"]
    assert first["ratio"] == 1.0 and first["ms_per_token"] > 0 and first["prefill_ms"] > 0
    for timed in result["decoders"].values():
        assert timed["ratio"] == pytest.approx(timed["ms_per_token"] / first["ms_per_token"])
        assert timed["tokens_per_s"] == pytest.approx(1000 / timed["ms_per_token"])


def test_a_decoder_without_a_cache_is_a_clear_error(tmp_path):
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

        def forward(self, input_ids, attention_mask):
            return self.head(self.embed(input_ids) * attention_mask[..., None])

    path = tmp_path / "plain.onnx"
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    export_onnx(Plain().eval(), batch, path, exporter="torchscript")
    for call in (lambda: check_generation(path, Plain(), _held_out()), lambda: decode_latency(path, path, [5, 6, 7])):
        with pytest.raises(ValidationError, match="no past_key_values.*inputs: not a decoder with a KV cache") as e:
            call()
        assert "\n" not in str(e.value)


def test_held_out_prompts_are_unpadded_rows_capped():
    prompts = held_out_prompts(_held_out(), 5, max_tokens=10)
    assert [len(p) for p in prompts] == [9, 10, 10]
    assert all(p.dtype == np.int64 for p in prompts)
    with pytest.raises(ValidationError, match="no held-out row"):
        held_out_prompts([{"input_ids": torch.ones(2, 1, dtype=torch.long)}], 3)
