"""Decoders with a KV cache (models.decoder): the cache as tensors in and out, in PyTorch.

The exported graphs and their generation check are in tests/onnx/test_generate.py and
the convert runs below (slow tier: each exports two decoders with dynamo).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actsparse_deploy.base.errors import ExportError
from actsparse_deploy.models.decoder import CacheLayout, WithPast, causal_lm, decoder_batch, decoder_example, position_ids
from actsparse_deploy.models.hf import wrap_pretrained

from ..helpers import invoke

VOCAB = 96


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)).eval()


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding, as the held-out text batches have it
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("build, layout", [(_llama, CacheLayout(2, 2, 8)), (_gpt2, CacheLayout(3, 4, 8))])
def test_the_cache_layout_is_read_from_the_config(build, layout):
    assert CacheLayout.of(build()) == layout


@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_a_first_step_and_then_token_by_token_give_the_full_pass_logits(build):
    model = wrap_pretrained(build(), "causal-lm")
    decoder = WithPast(causal_lm(model))
    batch = _batch()
    with torch.no_grad():
        full = model(**batch)["logits"]  # zero at padding positions
        logits, *present = decoder(**decoder_batch(batch, decoder.layout))
        keep = batch["attention_mask"].unsqueeze(-1).bool()
        torch.testing.assert_close(logits * keep, full, atol=1e-5, rtol=0)
        assert len(present) == 2 * decoder.layout.layers and present[0].shape[2] == 7
        # the unpadded rows: a prefill of 4, then one token at a time with the cache
        rows = {k: v[[0, 2]] for k, v in batch.items()}
        out, *past = decoder(**decoder_batch({k: v[:, :4] for k, v in rows.items()}, decoder.layout))
        for t in range(4, 7):
            mask = torch.ones(2, t + 1, dtype=torch.long)
            step = {"input_ids": rows["input_ids"][:, t:t + 1], "attention_mask": mask, "position_ids": position_ids(mask, 1),
                    **dict(zip(decoder.layout.past_names(), past))}
            out, *past = decoder(**step)
            torch.testing.assert_close(out[:, 0], full[[0, 2], t], atol=1e-5, rtol=0)
        assert past[0].shape[2] == 7


def test_positions_skip_padding_and_continue_after_the_past():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]])
    assert position_ids(mask, 4).tolist() == [[0, 1, 2, 3], [1, 1, 0, 1], [0, 1, 1, 1]]
    assert position_ids(mask, 2).tolist() == [[2, 3], [0, 1], [1, 1]]


def test_the_export_example_has_a_past_and_the_first_steps_an_empty_one():
    layout = CacheLayout(2, 2, 8)
    example = decoder_example(_batch(), layout)
    assert list(example) == list(layout.io_spec().input_names)
    assert example["attention_mask"].shape == (3, 10) and example["past_key_values.1.value"].shape == (3, 2, 3, 8)
    assert example["position_ids"][0].tolist() == list(range(3, 10))
    first = decoder_batch(_batch(), layout)
    assert first["past_key_values.0.key"].shape == (3, 2, 0, 8) and first["attention_mask"].shape == (3, 7)
    spec, first_step = layout.io_spec(), layout.first_step_spec()
    assert spec.output_names == ("logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value")
    assert spec.dynamic_axes["attention_mask"] == {0: "batch_size", 1: "total_sequence_length"}
    assert first_step.dynamic_axes["attention_mask"] == {0: "batch_size", 1: "sequence_length"}
    assert first_step.dynamic_axes["past_key_values.0.key"] == {0: "batch_size"}


def test_only_causal_language_models_have_a_decoder():
    assert causal_lm(wrap_pretrained(_llama(), "causal-lm")) is not None
    assert causal_lm(wrap_pretrained(_llama(), "feature-extraction")) is None
    assert causal_lm(torch.nn.Linear(2, 2)) is None
    with pytest.raises(ExportError, match="cannot be laid out; try --no-cache"):
        CacheLayout.of(torch.nn.Linear(2, 2))


# --- convert, end to end (slow: two dynamo exports with a cache, the generation check, decode latency) ------------------


@pytest.mark.slow
def test_tiny_lm_converts_to_a_decoder_with_a_cache(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("convert", "tiny-lm", "-o", out, "--json", "--threads", "1")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["export"]["cache"] is True and report["export"]["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert report["validation"]["passed"] is True
    generation = report["validation"]["generation"]
    assert generation["passed"] and generation["tokens_identical"] and generation["onnx"] == str(out / "model.onnx")
    assert generation["prompts"] == 3 and generation["new_tokens"] == 32 and len(generation["step_max_abs_diff"]) == 32
    assert [len(t) for t in generation["tokens"]] == [32, 32, 32] and generation["max_abs_diff"] <= 1e-4
    decode = report["latency"]["decode"]
    assert decode["dense_ms_per_token"] > 0 and decode["sparse_ms_per_token"] > 0 and decode["new_tokens"] == 64
    assert decode["ratio"] == pytest.approx(decode["sparse_ms_per_token"] / decode["dense_ms_per_token"], rel=1e-6)
    assert report["cost"]["perplexity_onnx"] == pytest.approx(report["cost"]["perplexity_sparse"], rel=1e-4)
    from actsparse_deploy.app.render import decode_lines, generation_lines
    from actsparse_deploy.app.report import Report

    typed = Report.from_json(report)  # what the summary prints
    assert typed.validation.generation.tokens == generation["tokens"] and typed.latency.decode.ratio == decode["ratio"]
    assert "32 greedy tokens after 3 held-out prompts: identical" in generation_lines(typed.validation.generation)[0]
    assert "64 new tokens" in decode_lines(typed.latency.decode)[0]
