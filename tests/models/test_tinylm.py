"""The built-in decoder LM ``tiny-lm``: shipped files, text splits, tokenizer,
recipe, and the perplexity metric its cost is measured by."""

from __future__ import annotations

import json
import math
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import save_file
from torch import nn

from actsparse_deploy.app.cost import sparsification_cost
from actsparse_deploy.base.errors import DataError, ModelLoadError, WeightsError
from actsparse_deploy.calibration.recipe import Recipe
from actsparse_deploy.data.workload import Workload
from actsparse_deploy.models import tinylm, zoo
from actsparse_deploy.onnx.metrics import perplexity

from ..helpers import invoke, one_line_error


@pytest.fixture(scope="module")
def lm() -> tinylm.TinyLM:
    return zoo.load_builtin("tiny-lm")


@pytest.fixture(scope="module")
def heldout() -> list[dict[str, torch.Tensor]]:
    return zoo.heldout_batches("tiny-lm")


def test_shipped_model_loads_offline_with_its_documented_perplexity(lm, heldout) -> None:
    assert isinstance(lm.lm.model.layers[0].mlp.down_proj, nn.Linear)
    assert lm.lm.lm_head.weight is lm.lm.model.embed_tokens.weight  # tied, as trained
    assert all(p.dtype == torch.float32 for p in lm.parameters()) and not lm.training
    assert sum(p.numel() for p in lm.parameters()) == 4_458_752
    meta = zoo.builtin_metadata("tiny-lm")
    dense = perplexity(lm, heldout)
    assert dense == pytest.approx(tinylm.HELDOUT_PERPLEXITY, rel=1e-5)
    assert dense == pytest.approx(float(meta["heldout_perplexity"]), rel=1e-5)
    # a language model, not a unigram table: far below the unigram perplexity on the same tokens
    assert dense < 0.5 * float(meta["unigram_heldout_perplexity"])
    # float16 storage costs (almost) nothing against the float32 weights it was trained as
    assert dense == pytest.approx(float(meta["float32_heldout_perplexity"]), rel=2e-3)


def test_forward_takes_ids_and_mask_and_returns_logits(lm, heldout) -> None:
    ids = heldout[0]["input_ids"][:2, :16]
    with torch.no_grad():
        logits = lm(ids)
        masked = lm(ids, torch.ones_like(ids))
        # the wrapper's own causal mask gives what transformers' own mask path gives
        reference = lm.lm(input_ids=ids, use_cache=False).logits
        # causal: a token's logits never see later tokens
        prefix = lm(ids[:, :8])
    assert logits.shape == (2, 16, 4096)
    torch.testing.assert_close(masked, logits, rtol=0, atol=0)
    torch.testing.assert_close(reference, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefix, logits[:, :8], rtol=1e-5, atol=1e-5)


def test_tokenizer_round_trips_text() -> None:
    tokenizer = tinylm.load_tokenizer()
    assert tokenizer.get_vocab_size() == 4096 and tokenizer.token_to_id(tinylm.EOS_TOKEN) == 0
    texts = [*tinylm.split_texts("heldout")[:3], "naïve café — ✓ 漢字\t\n  x = {'a': 1}\r\n", ""]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    # byte-level: no unknown token, whatever the bytes
    assert tokenizer.encode("\x00\x7f\U0001f600").ids


def test_splits_are_disjoint_and_cover_every_topic() -> None:
    splits = {s: set(tinylm.split_topics(s)) for s in tinylm.SPLITS}
    assert not splits["train"] & splits["calibration"]
    assert not splits["train"] & splits["heldout"]
    assert not splits["calibration"] & splits["heldout"]
    assert set().union(*splits.values()) == set(topics)
    chars = {s: sum(len(topics[t]) for t in names) for s, names in splits.items()}
    assert chars["calibration"] >= 40_000 and chars["heldout"] >= 40_000 and chars["train"] > 300_000


def test_data_rows_are_fixed_length_unpadded_and_come_from_their_split() -> None:
    calibration = zoo.calibration_batches("tiny-lm")
    held = zoo.heldout_batches("tiny-lm", batch_size=16)
    assert [tuple(b["input_ids"].shape) for b in calibration] == [(8, 64)] * 16
    assert [tuple(b["input_ids"].shape) for b in held] == [(16, 64)] * 4
    assert all(bool(b["attention_mask"].all()) and b["input_ids"].dtype == torch.int64 for b in calibration + held)
    stream = tinylm.token_stream("heldout")
    rows = torch.cat([b["input_ids"] for b in held])
    chunks = stream[: len(stream) // 64 * 64].reshape(-1, 64)
    assert rows[0].tolist() == chunks[0].tolist() and rows[-1].tolist() == chunks[-1].tolist()
    assert all(any(bool((row == c).all()) for c in chunks) for row in rows[:4])
    with pytest.raises(DataError, match="'train'"):
        tinylm.tiny_lm_batches("train")
    with pytest.raises(DataError, match="holds 2 rows of 64, not 3"):
        tinylm.token_rows(torch.arange(130), 3)


def test_recipe_masks_every_down_proj_input() -> None:
    recipe = Recipe.load(zoo.builtin_recipe_path("tiny-lm"))
    selected = recipe.select(tinylm.build_tiny_lm())
    assert sorted(selected) == [f"lm.model.layers.{i}.mlp.down_proj" for i in range(4)]
    assert {layer.sparse_config["sparsity_level"] for layer in selected.values()} == {0.25}
    assert {(layer.method.name, layer.compensate) for layer in selected.values()} == {("obs", "lstsq")}
    assert Recipe.from_toml(recipe.dumps()) == recipe


def test_perplexity_of_uniform_logits_is_the_vocabulary_and_respects_the_mask(tmp_path: Path) -> None:
    class Uniform(nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*input_ids.shape, 7)
            return logits.index_fill(2, torch.tensor([3]), math.log(8.0))  # token 3: 8x as likely

    ids = torch.tensor([[1, 3, 3, 5], [2, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    batch = {"input_ids": ids, "attention_mask": mask}
    # predicted tokens: 3, 3, 5 | 2, 3 (the last one masked): p(3) = 8/14, p(other) = 1/14
    expected = math.exp(-(3 * math.log(8 / 14) + 2 * math.log(1 / 14)) / 5)
    assert perplexity(Uniform(), [batch]) == pytest.approx(expected, rel=1e-6)  # float32 logits
    # the same arithmetic on an ONNX model's logits (real onnxruntime)
    onnx_path = tmp_path / "uniform.onnx"
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["input_ids"], ["shape"]),
            helper.make_node("Concat", ["shape", "vocab"], ["full"], axis=0),
            helper.make_node("Expand", ["row", "full"], ["logits"]),
        ],
        "uniform",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "t"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", 7])],
        [
            helper.make_tensor("vocab", TensorProto.INT64, [1], [7]),
            helper.make_tensor("row", TensorProto.FLOAT, [7], [0, 0, 0, math.log(8.0), 0, 0, 0]),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), onnx_path)
    assert perplexity(onnx_path, [batch]) == pytest.approx(expected, rel=1e-6)
    # a Hugging Face causal LM (no built-in, task "causal-lm") is costed by its perplexity too
    work = Workload("hf-lm", Uniform(), None, None, [batch], task="causal-lm")
    cost = sparsification_cost(work, Uniform(), onnx_path)
    assert cost["perplexity_dense"] == cost["perplexity_sparse"] == pytest.approx(expected, rel=1e-6)
    assert cost["perplexity_onnx"] == pytest.approx(expected, rel=1e-6)
    assert "perplexity_dense" not in sparsification_cost(Workload("enc", Uniform(), None, None, [batch], task="feature-extraction"), Uniform())
    with pytest.raises(DataError, match="no next token"):
        perplexity(Uniform(), [{"input_ids": ids[:, :1], "attention_mask": mask[:, :1]}])
    with pytest.raises(DataError, match=r"logits \(batch, tokens, vocabulary\).*got logits \[2, 7\]"):
        perplexity(nn.Linear(4, 7), [torch.randn(2, 4)])


def test_cost_of_a_causal_lm_is_its_heldout_perplexity(lm, heldout) -> None:
    entry = zoo.get_builtin("tiny-lm")
    held = heldout[:2]
    work = Workload("tiny-lm", lm, entry, None, held, None, entry.io_spec())
    sparse = tinylm.build_tiny_lm()
    sparse.load_state_dict(lm.state_dict())
    with torch.no_grad():  # a quarter of each MLP's hidden features gone, as a fold would
        for layer in sparse.lm.model.layers:
            layer.mlp.down_proj.weight[:, :192] = 0
    cost = sparsification_cost(work, sparse)
    assert cost["perplexity_dense"] == pytest.approx(perplexity(lm, held), rel=1e-12)
    assert cost["perplexity_sparse"] == pytest.approx(perplexity(sparse, held), rel=1e-12)
    assert cost["perplexity_sparse"] > cost["perplexity_dense"]
    assert "accuracy_dense" not in cost and "perplexity_onnx" not in cost
    json.dumps(cost)  # report.json material
    # the other built-ins' cost has no perplexity
    digits = zoo.get_builtin("digits-mlp")
    images = zoo.heldout_batches("digits-mlp")[:1]
    mlp = zoo.load_builtin("digits-mlp")
    assert not any(k.startswith("perplexity") for k in sparsification_cost(Workload("d", mlp, digits, None, images), mlp))


def test_missing_or_foreign_files_name_the_training_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(zoo.MODELS_DIR_ENV, str(tmp_path))
    with pytest.raises(ModelLoadError, match="tiny-lm.safetensors.*python tools/train_tiny_lm.py"):
        zoo.load_builtin("tiny-lm")
    with pytest.raises(ModelLoadError, match="tiny-lm.safetensors.*python tools/train_tiny_lm.py"):
        zoo.builtin_metadata("tiny-lm")
    with pytest.raises(ModelLoadError, match="tiny-lm-tokenizer.json.*python tools/train_tiny_lm.py"):
        tinylm.load_tokenizer(tmp_path / tinylm.TOKENIZER_FILENAME)
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "other.json"))
    with pytest.raises(ModelLoadError, match=r"other.json is not tiny-lm's tokenizer: expected 4096 tokens .* got 0"):
        tinylm.load_tokenizer(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read the tiny-lm tokenizer .*broken.json"):
        tinylm.load_tokenizer(tmp_path / "broken.json")
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4)}, str(tmp_path / tinylm.WEIGHTS_FILENAME))
    with pytest.raises(WeightsError, match="does not fit built-in model 'tiny-lm'.*train_tiny_lm.py") as info:
        zoo.load_builtin("tiny-lm")
    message = str(info.value)
    assert "\n" not in message and "37 tensor(s) missing (model.layers.0.self_attn.q_proj.weight" in message
    assert "model.embed_tokens.weight is [8, 4], expected [4096, 256]" in message
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4), "lm_head.weight": torch.ones(8, 4)},
              str(tmp_path / tinylm.WEIGHTS_FILENAME))
    with pytest.raises(WeightsError, match="ties its output layer.*lm_head.weight differs"):
        zoo.load_builtin("tiny-lm")
    result = invoke("inspect", "tiny-lm")  # the command line: one line, the weights exit code
    one_line_error(result, WeightsError.exit_code)


def test_models_command_lists_tiny_lm() -> None:
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.output
    row = next(r for r in json.loads(result.stdout) if r["name"] == "tiny-lm")
    assert row["task"] == "causal-lm" and row["recipe"].endswith("tiny-lm.toml") and row["test_accuracy"] is None
    assert np.isfinite(tinylm.HELDOUT_PERPLEXITY)
    assert row["heldout_perplexity"] == pytest.approx(tinylm.HELDOUT_PERPLEXITY, abs=1e-5)


def test_summary_states_the_perplexity_cost() -> None:
    from actsparse_deploy.app.render import cost_lines
    from actsparse_deploy.app.report import Report

    cost = {
        "outputs": [{"output": "logits", "max_abs_diff": 0.5, "cosine_mean": 0.99, "cosine_min": 0.98}],
        "heldout_samples": 64, "perplexity_dense": 94.788, "perplexity_sparse": 96.667, "perplexity_onnx": 96.6671,
    }
    report = Report(model="tiny-lm", cost=cost)
    assert Report.from_json(report.to_json()).cost.extra["perplexity_onnx"] == 96.6671  # report.json keeps it
    out = "\n".join(cost_lines(report.cost))
    assert "held-out perplexity dense 94.788 -> sparse 96.667 (x1.020) (ONNX 96.667)" in out
    assert "accuracy" not in out
