"""``calibrate`` of a model whose weights do not fit the memory budget (issue: real model sizes,
"calibrate block by block"): a Hugging Face directory's blocks stay in their ``.safetensors``
files and each layer's weights are read while it runs (and while its mask is chosen), so the
masks are those of the whole model in memory, and a model that does not fit even so is exit 13
before any work. The budget is counted in weights here (the process's own memory set to 0),
as in ``test_one_copy.py``; the model is tiny and random, saved in bfloat16 like most language
models are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actsparse_deploy.app.calibrate import RecipeFlags, calibrate_model
from actsparse_deploy.calibration.masks import Masks

from ..helpers import invoke, one_line_error
from ..models.test_hf import LINES, _tokenizer


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Llama of four blocks, wide and with a narrow MLP (its blocks' weights well over the statistics of its MLPs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("by_block")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.to(torch.bfloat16).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    (root / "calib.txt").write_text("\n".join(LINES) + "\n")
    return root / "llama", root / "calib.txt"


def _weights(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.fixture
def weights_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget in weights alone: the process holds nothing else."""
    from actsparse_deploy.app import calibrate
    from actsparse_deploy.base import memory

    monkeypatch.setattr(memory, "resident_memory", lambda: 0)
    monkeypatch.setattr(calibrate, "resident_memory", lambda: 0)


def _calibrate(llama: tuple[Path, Path], out: Path, **kwargs) -> dict:
    from actsparse_deploy.models.loading import ModelOptions

    directory, text = llama
    report = calibrate_model(str(directory), out, RecipeFlags(), model_options=ModelOptions(text=str(text)), batch_size=4, **kwargs)
    assert report is not None
    return report.to_json()


def test_a_model_over_the_budget_is_calibrated_block_by_block_to_the_masks_of_the_whole_model(llama, tmp_path: Path, weights_only,
                                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy.models import loading

    load_model, offloaded = loading.load_model, []

    def spy(*args, **kwargs):  # the model calibrated is the one loaded block by block: its blocks on meta
        loaded = load_model(*args, **kwargs)
        offloaded.append(all(p.is_meta for p in loaded.module.model.layers.parameters()))
        return loaded

    monkeypatch.setattr(loading, "load_model", spy)
    whole = _calibrate(llama, tmp_path / "whole.safetensors")
    by_block = _calibrate(llama, tmp_path / "block.safetensors", max_memory=_weights(llama[0]))  # 1.2x the weights do not fit
    assert offloaded == [False, True]
    assert "memory" not in whole  # neither asked for nor needed
    assert by_block["memory"]["by_block"] is True and by_block["memory"]["budget_bytes"] == _weights(llama[0])
    a, b = Masks.load(tmp_path / "whole.safetensors"), Masks.load(tmp_path / "block.safetensors")
    assert list(a.layers) == list(b.layers) and len(a.layers) == 4  # the default recipe: every MLP's down_proj, obs + lstsq
    for name, mask in a.layers.items():
        assert torch.equal(mask.mask, b[name].mask), name
        assert mask.weight is not None and b[name].weight is not None and torch.equal(mask.weight, b[name].weight), name  # the refit read the weights
    assert a.num_samples == b.num_samples > 0
    with_budget = _calibrate(llama, tmp_path / "fits.safetensors", max_memory="100GB")  # asked for, and the whole model fits
    assert with_budget["memory"]["weights_bytes"] == _weights(llama[0]) and "by_block" not in with_budget["memory"]


def test_loaded_block_by_block_the_blocks_wait_on_disk(llama) -> None:
    from actsparse_deploy.models.loading import load_model
    from actsparse_deploy.nn.modules import block_bytes, check_finite_weights, largest_blocks

    loaded = load_model(str(llama[0]), by_block=True)
    model = loaded.module
    assert largest_blocks(model) == "model.layers" and block_bytes(model, "model.layers") > 0
    assert all(p.is_meta for p in model.model.layers.parameters())  # no memory for the blocks' weights
    assert not model.model.embed_tokens.weight.is_meta
    check_finite_weights(model)  # reads them a layer at a time, and lets them go
    assert all(p.is_meta for p in model.model.layers.parameters())
    ids = torch.randint(0, 100, (2, 8))
    whole = load_model(str(llama[0])).module
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids)["logits"], whole(input_ids=ids)["logits"])


def test_nan_in_a_block_on_disk_is_the_weights_fault(llama, tmp_path: Path, weights_only) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    directory = tmp_path / "nan"
    shutil.copytree(llama[0], directory)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    result = invoke("calibrate", directory, "--text", llama[1], "-o", tmp_path / "m.safetensors", "--max-memory", _weights(directory))
    one_line_error(result, 5, "model.layers.2.mlp.up_proj.weight", "NaN")


def test_the_cli_says_it_calibrated_block_by_block(llama, tmp_path: Path, weights_only) -> None:
    out = tmp_path / "m.safetensors"
    result = invoke("calibrate", llama[0], "--text", llama[1], "-o", out, "--max-memory", _weights(llama[0]), "--batch-size", 4)
    assert result.exit_code == 0, result.output
    assert "calibrated block by block" in result.stdout and "peak memory" in result.stdout and out.exists()
    result = invoke("calibrate", llama[0], "--text", llama[1], "-o", tmp_path / "j.safetensors", "--max-memory", _weights(llama[0]), "--json")
    assert json.loads(result.stdout)["memory"]["by_block"] is True


def test_a_model_that_does_not_fit_even_block_by_block_is_exit_13_before_any_work(llama, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    line = one_line_error(invoke("calibrate", llama[0], "--text", llama[1], "-o", out, "--max-memory", "1MB"), 13, "block by block",
                          "--max-memory 1.00 MB")
    assert "statistics" in line
    assert not out.exists()
    one_line_error(invoke("calibrate", "digits-mlp", "-o", out, "--max-memory", "1MB"), 13, "only a Hugging Face model directory")
    assert not out.exists()


@pytest.mark.parametrize(("flags", "needle"), [(("--max-cost", "cosine=0.99"), "--max-cost"), (("--recover",), "--recover")])
def test_what_needs_the_whole_model_is_refused_block_by_block(llama, tmp_path: Path, weights_only, flags, needle: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy.models import loading

    called = []
    original = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: called.append(a) or original(*a, **k))
    result = invoke("calibrate", llama[0], "--text", llama[1], "-o", tmp_path / "m.safetensors", "--max-memory", _weights(llama[0]), *flags)
    one_line_error(result, 13, needle, "over the memory budget")
    assert not called  # before the model loads


def _bert(vocab: int) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=vocab, hidden_size=128, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                                max_position_embeddings=64))


def _gpt2(vocab: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=128, n_inner=32, n_layer=4, n_head=4, n_positions=64))


@pytest.mark.parametrize("family", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_other_families_calibrate_block_by_block_to_the_same_masks(tmp_path: Path, weights_only, family) -> None:
    """BERT's blocks are ``encoder.layer`` (float32), GPT-2's ``transformer.h`` (its ``Conv1D`` weights read for
    the refit); both with their MLP narrow beside their attention, so that a block fits where the whole does not."""
    from actsparse_deploy.models.loading import ModelOptions

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    family(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n".join(LINES) + "\n")
    options = ModelOptions(text=str(tmp_path / "calib.txt"))
    for name, budget in (("whole", None), ("block", _weights(tmp_path / "model"))):
        report = calibrate_model(str(tmp_path / "model"), tmp_path / f"{name}.safetensors", RecipeFlags(), model_options=options,
                                 batch_size=4, max_memory=budget)
        assert report is not None and (report.memory is not None and report.memory.by_block) == (name == "block")
    a, b = Masks.load(tmp_path / "whole.safetensors"), Masks.load(tmp_path / "block.safetensors")
    assert len(a.layers) == 4
    for name, mask in a.layers.items():
        assert torch.equal(mask.mask, b[name].mask), name
        assert (mask.weight is None) == (b[name].weight is None) and (mask.weight is None or torch.equal(mask.weight, b[name].weight)), name


@pytest.mark.parametrize(("times", "by_block"), [(3.0, False), (2.5, True)])
def test_statistics_over_the_budget_are_collected_a_few_blocks_at_a_time(llama, tmp_path: Path, weights_only, times: float,
                                                                         by_block: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--heads``: each attention output's Gram matrix (256 features: 2.25 MB for the four, and choosing one mask
    holds 5.5 of them) is about the model's weights (2.28 MB). Three times the weights hold the whole model and a few
    blocks' statistics: the data runs once per pass, each forward pass stopped after the pass's last block; 2.5 times
    hold only block by block, one block's statistics a pass.
    The masks are the whole model's (obs on whole heads reads the output projection's weight, the refit its columns)."""
    from actsparse_deploy.calibration import calibrate
    from actsparse_deploy.models.loading import ModelOptions

    stops = []

    def stop(module, args, output):  # each forward pass a pass cut short (all but the last pass's)
        stops.append(module)
        raise calibrate._Stop

    monkeypatch.setattr(calibrate, "_stop", stop)
    directory, text = llama
    for name, budget in (("whole", None), ("parts", int(times * _weights(directory)))):
        report = calibrate_model(str(directory), tmp_path / f"{name}.safetensors", RecipeFlags(heads=True),
                                 model_options=ModelOptions(text=str(text)), batch_size=4, max_memory=budget)
        assert report is not None
    memory = report.memory
    assert memory is not None and memory.passes is not None and memory.passes >= 2 and bool(memory.by_block) is by_block
    assert report.calibration is not None and len(stops) == (memory.passes - 1) * report.calibration.batches  # the passes ran
    a, b = Masks.load(tmp_path / "whole.safetensors"), Masks.load(tmp_path / "parts.safetensors")
    heads = [name for name in a.layers if name.endswith("o_proj")]
    assert len(heads) == 4 and list(a.layers) == list(b.layers) and a.num_samples == b.num_samples
    for name, mask in a.layers.items():
        assert torch.equal(mask.mask, b[name].mask), name
        assert (mask.weight is None) == (b[name].weight is None) and (mask.weight is None or torch.equal(mask.weight, b[name].weight)), name
    assert any(mask.weight is not None for mask in a.layers.values())  # refits compared


def test_the_cli_says_how_many_passes(llama, tmp_path: Path, weights_only) -> None:
    result = invoke("calibrate", llama[0], "--text", llama[1], "--heads", "-o", tmp_path / "m.safetensors", "--max-memory",
                    3 * _weights(llama[0]))
    assert result.exit_code == 0, result.output
    assert "the statistics of a few blocks at a time" in result.stdout and "passes over the data" in result.stdout
    stats = invoke("calibrate", llama[0], "--text", llama[1], "--heads", "-o", tmp_path / "s.safetensors", "--stats-only", "--max-memory",
                   4 * _weights(llama[0]))  # a statistics file holds them all: in one pass
    assert stats.exit_code == 0, stats.output
