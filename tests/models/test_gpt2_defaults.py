"""GPT-2 directories at the default settings: its ``Conv1D`` keeps its weight as
``(in, out)``, and the compensation's new weight goes through the layer kind
(``(out, in, *kernel)`` in a masks file, the layer's own layout in the model).

The model is tiny and random (a ``GPT2Config``, ``save_pretrained``, the byte-level
BPE tokenizer of tests/models/test_hf.py): nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from actsparse_deploy import Masks
from actsparse_deploy.base.errors import MaskError
from actsparse_deploy.calibration.masks import LayerMask
from actsparse_deploy.nn.layers import layer_kind

from ..helpers import invoke
from .test_hf import HELD, LINES, _tokenizer

PROJ = [f"transformer.h.{i}.mlp.c_proj" for i in range(2)]


class GPT2Files:
    """A GPT-2 directory (model + tokenizer.json) and text files."""

    def __init__(self, root: Path) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        tokenizer = _tokenizer()
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        self.directory = root / "tiny-gpt2"
        GPT2LMHeadModel(config).eval().save_pretrained(self.directory)
        tokenizer.save_pretrained(self.directory)
        self.calib, self.held = root / "calib.txt", root / "held.txt"
        self.calib.write_text("\n".join(LINES) + "\n", encoding="utf-8")
        self.held.write_text("\n".join(HELD) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> GPT2Files:
    return GPT2Files(tmp_path_factory.mktemp("gpt2"))


def test_gpt2_directory_converts_with_default_flags(gpt2: GPT2Files, tmp_path: Path) -> None:
    """Before, exit 8: "weight of layer 'transformer.h.0.mlp.c_proj' has 256 input
    features, its mask of shape [1024] does not: the masks file is corrupted"."""
    result = invoke("convert", gpt2.directory, "--task", "causal-lm", "--text", gpt2.calib, "--heldout-text", gpt2.held,
                    "-o", tmp_path / "out", "--json", "--no-latency", "--no-cache")  # GPT-2 with its cache: test_generate.py
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["layer"] for row in report["layers"]] == PROJ
    assert {(row["method"], row["compensate"]) for row in report["layers"]} == {("obs", "lstsq")}
    assert report["validation"]["passed"] is True


def test_gpt2_masks_round_trip_through_a_file(gpt2: GPT2Files, tmp_path: Path) -> None:
    """`calibrate -o masks` (obs, lstsq) then `squash --masks`: the file holds the
    new weight as (out, in); squashed, the layer gets it back in its own (in, out)."""
    from actsparse_deploy.bake.squash import squash
    from actsparse_deploy.models.loading import load_model

    masks_path = tmp_path / "masks.safetensors"
    result = invoke("calibrate", gpt2.directory, "--task", "causal-lm", "--text", gpt2.calib, "-o", masks_path)
    assert result.exit_code == 0, result.output
    masks = Masks.load(masks_path)
    for name in PROJ:
        assert masks[name].compensate == "lstsq"
        assert list(masks[name].weight.shape) == [64, 256] and list(masks[name].mask.shape) == [256]
    result = invoke("squash", gpt2.directory, "--task", "causal-lm", "--masks", masks_path, "--heldout-text", gpt2.held,
                    "--mode", "mul", "-o", tmp_path / "model.pt2")
    assert result.exit_code == 0, result.output
    model = load_model(str(gpt2.directory)).module
    squashed = squash(model, masks, "mul").model
    for name in PROJ:
        layer = squashed.get_submodule(name)
        layer = getattr(layer, "module", layer)
        assert tuple(layer.weight.shape) == (256, 64)
        assert_close(layer.weight.detach(), masks[name].weight.T)


def test_conv1d_weight_layout_belongs_to_its_kind() -> None:
    """Every kind turns its weight into (out, in, *kernel) and back."""
    from transformers.pytorch_utils import Conv1D

    for layer, standard in ((nn.Linear(3, 5), (5, 3)), (Conv1D(5, 3), (5, 3)), (nn.Conv2d(3, 5, 2), (5, 3, 2, 2)),
                            (nn.ConvTranspose2d(3, 5, 2), (5, 3, 2, 2))):
        kind = layer_kind(layer)
        out = kind.standard_weight(layer)
        assert tuple(out.shape) == standard, type(layer).__name__
        assert torch.equal(kind.native_weight(layer, out), layer.weight)
    layer = Conv1D(5, 3)  # weight (in, out) = (3, 5)
    assert torch.equal(layer_kind(layer).standard_weight(layer), layer.weight.T)


def test_masks_made_here_do_not_blame_a_masks_file(tmp_path: Path) -> None:
    """A weight edit that does not fit its mask: a masks file says its path; masks
    made in this process say nothing of a file."""
    bad = LayerMask(torch.ones(4), weight=torch.ones(2, 3), method="obs", compensate="lstsq")
    with pytest.raises(MaskError) as made:
        Masks({"fc": bad})
    assert "file" not in str(made.value) and "3 input features" in str(made.value)
    good = Masks({"fc": LayerMask(torch.ones(3), weight=torch.ones(2, 3), method="obs", compensate="lstsq")})
    path = tmp_path / "m.safetensors"
    good.save(path)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["fc"] = torch.ones(4)
    rows = json.loads(metadata["layers"])
    rows[0]["mask_shape"] = [4]
    save_file(tensors, str(path), metadata={**metadata, "layers": json.dumps(rows)})
    with pytest.raises(MaskError) as loaded:
        Masks.load(path)
    assert f"masks file {path}" in str(loaded.value) and "3 input features" in str(loaded.value)


def _drop_layout(path: Path) -> None:
    """Rewrite a masks file as earlier versions wrote it: rows without ``weight_layout``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    rows = json.loads(metadata["layers"])
    assert all(row.pop("weight_layout", None) == "out-in" for row in rows if "weight_shape" in row)
    save_file(load_file(str(path)), str(path), metadata={**metadata, "layers": json.dumps(rows)})


def test_a_masks_file_of_an_earlier_version_keeps_its_conv1d_weight_layout(tmp_path: Path) -> None:
    """Masks files written before the shared layout stored a Conv1D's new weight in
    the layer's own (in, out) layout (for a square layer, the only one that loaded):
    such a file is read in that layout, never silently transposed; files written now
    say their layout and are read as (out, in)."""
    from transformers.pytorch_utils import Conv1D

    from actsparse_deploy.bake.squash import squash

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(4, 4))
    new_weight = torch.randn(4, 4)
    masks = Masks({"0": LayerMask(torch.tensor([1.0, 0.0, 1.0, 1.0]), weight=new_weight, method="obs", compensate="lstsq")})
    now, earlier = tmp_path / "now.safetensors", tmp_path / "earlier.safetensors"
    masks.save(now)
    masks.save(earlier)
    _drop_layout(earlier)
    for path, expected in ((now, new_weight.T), (earlier, new_weight)):
        squashed = squash(model, Masks.load(path), "mul").model
        layer = squashed.get_submodule("0")
        assert_close(getattr(layer, "module", layer).weight.detach(), expected, msg=str(path.name))
