"""The bad-input matrix: every case through the CLI, checking the exit code, a
message that names the problem, no traceback, and that no output file exists."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from actsparse_deploy.base.version import __version__
from actsparse_deploy.calibration.functions import MASK_FNS

from ..helpers import DigitsFiles, UserFolder, invoke, one_line_error, user_module, user_module_source

USER_MODULE = user_module_source(extra='''
from actsparse_deploy.calibration.functions import MASK_FNS, register_mask_fn


class Singular(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.linalg.svd(self.fc(x))[1]


def build_wide():
    torch.manual_seed(0)
    return Net(hidden=10)


def singular():
    return Singular()


def not_module():
    return 42


VALUE = 3

if "wrong_shape" not in MASK_FNS:
    @register_mask_fn("wrong_shape")
    def wrong_shape(data, sparsity_level):
        return torch.ones(3, 3)
''')


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@dataclass
class World(UserFolder):
    """Files for the cases; a fresh user module per test so imports do not leak."""

    out: Path
    digits: DigitsFiles  # files of the session, only read

    def data(self, name: str = "calib.npy", array: np.ndarray | None = None) -> Path:
        path = self.file(name)
        np.save(path, np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32) if array is None else array)
        return path


@pytest.fixture
def world(tmp_path, monkeypatch, digits_files):
    with user_module(tmp_path, USER_MODULE, monkeypatch) as name:
        yield World(tmp_path, name, tmp_path / "out.safetensors", digits_files)
        MASK_FNS._fns.pop("wrong_shape", None)


GOOD_RECIPE = '[defaults]\nsparse_config = { sparsity_level = 0.5 }\n[[layers]]\nname = "fc2"\n'


def _calibrate(w: World, *extra: object, model: str | None = None, data: Path | None = None, recipe: str = GOOD_RECIPE) -> list[object]:
    return ["calibrate", model or w.user(), "--data", data or w.data(), "--recipe", w.recipe(recipe), "-o", w.out, *extra]


def _weights(w: World, state: dict[str, torch.Tensor], name: str = "w.safetensors") -> Path:
    path = w.file(name)
    save_file(state, str(path))
    return path


def _good_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"fc1.weight": torch.randn(8, 4), "fc1.bias": torch.randn(8), "fc2.weight": torch.randn(2, 8), "fc2.bias": torch.randn(2)}


def _truncated(w: World) -> Path:
    path = _weights(w, _good_state())
    path.write_bytes(path.read_bytes()[:50])
    return path


def _pickle_pt(w: World) -> Path:
    path = w.file("evil.pt")
    torch.save({"fc1.weight": Evil(w.file("pwned"))}, path)
    return path


def _masks(w: World, model: str = "digits-cnn") -> Path:
    return w.digits.masks(model)


def _user_masks(w: World) -> Path:
    path = w.file("user-masks.safetensors")
    result = invoke(*_calibrate(w)[:-2], "-o", path)
    assert result.exit_code == 0, result.output
    return path


def _newer_masks(w: World) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file

    source = _masks(w)
    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata())
    path = w.file("newer.safetensors")
    save_file(load_file(str(source)), str(path), metadata={**meta, "format_version": "7"})
    return path


def _onnx(w: World) -> Path:
    return w.digits.dense_onnx("digits-mlp")


def _corrupt_onnx(w: World) -> Path:
    path = w.file("model.onnx")
    path.write_bytes(_onnx(w).read_bytes()[:200])
    return path


def _two_inputs(w: World) -> Path:
    path = w.file("two.npz")
    np.savez(path, a=np.ones((8, 1, 8, 8), np.float32), b=np.ones((8, 1), np.float32))
    return path


def _hostile_pt2(w: World) -> Path:
    """A real .pt2 with a pickled 'opaque object' added: torch.export.load would
    unpickle it (running Path.touch on the marker)."""
    import pickle
    import zipfile

    path = w.file("hostile.pt2")
    path.write_bytes(w.digits.pt2("digits-mlp").read_bytes())  # `actsparse squash digits-mlp`
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/")[0]
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{root}/data/constants/opaque_obj_0", pickle.dumps(Evil(w.file("pwned"))))
    return path


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk cannot be caused here without privileges: the one mocked fault."""

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("actsparse_deploy.base.serialize.save_file", no_space)


# id -> (args builder, exit code, message); builders get the World
CASES: dict[str, tuple[Callable[[World], list[object]], int, str]] = {
    # model
    "model unknown built-in": (lambda w: ["calibrate", "nope", "-o", w.out], 4, "unknown built-in model 'nope'; known models:"),
    "model module does not import": (lambda w: _calibrate(w, model="no_such_module_xyz:build"), 4, "cannot import 'no_such_module_xyz'"),
    "model attribute missing": (lambda w: _calibrate(w, model=w.user("nothing")), 4, "has no attribute 'nothing'"),
    "model not callable": (lambda w: _calibrate(w, model=w.user("VALUE")), 4, "is a int, not a callable"),
    "model factory returns no module": (lambda w: _calibrate(w, model=w.user("not_module")), 4, "returned a int, not a torch.nn.Module"),
    "model spec malformed": (lambda w: _calibrate(w, model=":build"), 4, "must look like package.module:name"),
    "model factory fails": (lambda w: ["calibrate", "torch.nn:Linear", "--layers", "x", "--sparsity", "0.5", "-o", w.out], 4, "failed: TypeError"),
    # weights
    "weights missing": (lambda w: _calibrate(w, "--weights", w.file("absent.safetensors")), 5, "does not exist"),
    "weights truncated": (lambda w: _calibrate(w, "--weights", _truncated(w)), 5, "not a readable .safetensors"),
    "weights garbage": (lambda w: _calibrate(w, "--weights", _garbage(w, "g.safetensors")), 5, "not a readable .safetensors"),
    "weights pickle of objects": (lambda w: _calibrate(w, "--weights", _pickle_pt(w)), 5, "refused"),
    "weights pt corrupted": (lambda w: _calibrate(w, "--weights", _garbage(w, "g.pt")), 5, "corrupted or not a torch file"),
    "weights missing keys": (lambda w: _calibrate(w, "--weights", _weights(w, {k: v for k, v in _good_state().items() if k != "fc2.bias"})), 5, "missing keys fc2.bias"),
    "weights unexpected keys": (lambda w: _calibrate(w, "--weights", _weights(w, {**_good_state(), "extra": torch.ones(1)})), 5, "unexpected keys extra"),
    "weights shape mismatch": (lambda w: _calibrate(w, "--weights", _weights(w, {**_good_state(), "fc1.weight": torch.ones(8, 5)})), 5, "fc1.weight: file (8, 5) vs model (8, 4)"),
    # recipe
    "recipe not toml": (lambda w: _calibrate(w, recipe="[defaults\n"), 3, "is not valid TOML"),
    "recipe unknown key": (lambda w: _calibrate(w, recipe=GOOD_RECIPE + "colour = 1\n"), 3, "unknown key(s) 'colour'"),
    "recipe unknown function": (lambda w: _calibrate(w, recipe='[defaults]\nmask_fn = "biggest"\n[[layers]]\nname = "fc2"\n'), 3, "unknown mask function 'biggest'; known: block,"),
    "recipe pattern matches nothing": (lambda w: _calibrate(w, recipe=GOOD_RECIPE.replace('"fc2"', '"decoder.*"')), 3, "matches no module of the model"),
    "recipe file missing": (lambda w: ["calibrate", "digits-cnn", "--recipe", w.file("absent.toml"), "-o", w.out], 3, "does not exist"),
    "cli layers match nothing": (lambda w: ["calibrate", "digits-cnn", "--layers", "decoder*", "--sparsity", "0.5", "-o", w.out], 3, "matches no module"),
    "cli layers without sparsity": (lambda w: ["calibrate", "digits-cnn", "--layers", "fc*", "-o", w.out], 3, "need --sparsity or --threshold"),
    "recipe sparsity above 1": (lambda w: _calibrate(w, recipe=GOOD_RECIPE.replace("0.5", "1.5")), 3, "sparsity_level must be a number in [0, 1], got 1.5"),
    "recipe sparsity below 0": (lambda w: _calibrate(w, recipe=GOOD_RECIPE.replace("0.5", "-0.2")), 3, "sparsity_level must be a number in [0, 1], got -0.2"),
    "cli sparsity out of range": (lambda w: ["calibrate", "digits-cnn", "--sparsity", "1.5", "-o", w.out], 2, "Invalid value for '--sparsity'"),
    "cli unknown option": (lambda w: ["calibrate", "digits-cnn", "--sparsty", "0.5", "-o", w.out], 2, "No such option: --sparsty"),
    "recipe features without feature_dim": (lambda w: _calibrate(w, recipe=GOOD_RECIPE + "features = [1, 2]\n"), 3, "features were given without feature_dim"),
    "recipe mask fn wrong shape": (lambda w: _calibrate(w, recipe=GOOD_RECIPE.replace('name = "fc2"', 'name = "fc2"\nmask_fn = "wrong_shape"')), 7, "does not broadcast against the layer's input"),
    # data
    "data missing": (lambda w: _calibrate(w, data=w.file("absent.npy")), 6, "does not exist"),
    "data corrupted npz": (lambda w: _calibrate(w, data=_garbage(w, "bad.npz", b"PK\x03\x04junk")), 6, "corrupted or unreadable"),
    "data wrong rank": (lambda w: _calibrate(w, data=w.data("r.npy", np.ones((5,), np.float32))), 6, "the model failed on calibration batch 0 (float32[5])"),
    "data wrong shape": (lambda w: _calibrate(w, data=w.data("s.npy", np.ones((5, 7), np.float32))), 6, "the model failed on calibration batch 0 (float32[5, 7])"),
    "data wrong dtype": (lambda w: _calibrate(w, data=w.data("i.npy", np.ones((5, 4), np.int64))), 6, "int64[5, 4]"),
    "data strings": (lambda w: _calibrate(w, data=w.data("t.npy", np.array([["a"] * 4] * 2))), 6, "which a model cannot take"),
    "data empty": (lambda w: _calibrate(w, data=w.data("e.npy", np.zeros((0, 4), np.float32))), 6, "is empty (0 samples)"),
    "data nan": (lambda w: _calibrate(w, data=w.data("n.npy", np.array([[1.0, np.nan, 0, 0]] * 3, np.float32))), 6, "holds NaN or Inf"),
    "data inf": (lambda w: _calibrate(w, data=w.data("f.npy", np.array([[1.0, np.inf, 0, 0]] * 3, np.float32))), 6, "holds NaN or Inf"),
    "data unsupported type": (lambda w: _calibrate(w, data=_garbage(w, "d.csv", b"1,2,3,4")), 6, "unsupported type .csv"),
    # masks
    "masks from another model": (lambda w: ["export", "digits-mlp", "--masks", _masks(w), "-o", w.file("m.onnx")], 8, "the masks come from another model"),
    "masks of other sizes": (lambda w: ["squash", w.user("build_wide"), "--masks", _user_masks(w), "--heldout", w.data(), "-o", w.file("m.pt2")], 8, "takes 10 input features: the masks come from another model"),
    "masks corrupted": (lambda w: ["export", "digits-cnn", "--masks", _garbage(w, "m.safetensors"), "-o", w.file("m.onnx")], 8, "not a readable .safetensors"),
    "masks newer format": (lambda w: ["export", "digits-cnn", "--masks", _newer_masks(w), "-o", w.file("m.onnx")], 8, "format version 7 by a newer actsparse_deploy"),
    "masks not a masks file": (lambda w: ["export", "digits-cnn", "--masks", _weights(w, _good_state()), "-o", w.file("m.onnx")], 8, "is not a actsparse.masks file"),
    # outputs
    "output directory missing": (lambda w: ["calibrate", "digits-cnn", "-o", w.file("no/such/dir/m.safetensors")], 11, "does not exist"),
    "output directory not writable": (lambda w: ["calibrate", "digits-cnn", "-o", "/sys/m.safetensors"], 11, "is not writable"),
    "output exists": (lambda w: ["calibrate", "digits-cnn", "-o", _garbage(w, "out.safetensors", b"keep")], 11, "already exists: pass --overwrite"),
    "output is a directory": (lambda w: ["calibrate", "digits-cnn", "-o", w.tmp, "--overwrite"], 11, "is a directory"),
    # export
    "export unsupported op dynamo": (lambda w: ["export", w.user("singular"), "--heldout", w.data(), "--exporter", "dynamo", "-o", w.file("m.onnx")], 9, "the dynamo exporter failed"),
    "export unsupported op torchscript": (lambda w: ["export", w.user("singular"), "--heldout", w.data(), "--exporter", "torchscript", "-o", w.file("m.onnx")], 9, "'aten::linalg_svd'"),
    "export unknown exporter": (lambda w: ["export", "digits-cnn", "--exporter", "tflite", "-o", w.file("m.onnx")], 2, "'tflite' is not one of"),
    "export data does not fit": (lambda w: ["export", w.user(), "--heldout", w.data("s.npy", np.ones((5, 7), np.float32)), "-o", w.file("m.onnx")], 6, "the model fails on the example input (float32[2, 7])"),
    "inspect data does not fit": (lambda w: ["inspect", w.user(), "--data", w.data("s.npy", np.ones((5, 7), np.float32))], 6, "the model fails on the first batch"),
    "calibrate user model without data": (lambda w: ["calibrate", w.user(), "--recipe", w.recipe(GOOD_RECIPE), "-o", w.out], 6, "has no built-in data: pass --data"),
    "convert user model without recipe": (lambda w: ["convert", w.user(), "--data", w.data(), "--heldout", w.data("h.npy"), "-o", w.file("outdir")], 3, "has no built-in recipe"),
    "inspect masks file missing": (lambda w: ["inspect", w.file("absent.safetensors")], 8, "does not exist"),
    "cli aggregate without layers": (lambda w: ["calibrate", "digits-cnn", "--aggregate", "sum_sq", "-o", w.out], 3, "give --layers too"),
    "pt2 with pickled objects": (lambda w: ["export", _hostile_pt2(w), "-o", w.file("m.onnx")], 9, "holds pickled Python objects"),
    "pt2 not a program": (lambda w: ["export", _garbage(w, "x.pt2"), "-o", w.file("m.onnx")], 9, "is not a torch.export program"),
    # validation
    "validate onnx corrupted": (lambda w: ["validate", _corrupt_onnx(w), "digits-mlp"], 10, "cannot load the ONNX model"),
    "validate onnx missing": (lambda w: ["validate", w.file("none.onnx"), "digits-mlp"], 10, "does not exist"),
    "validate inputs do not match": (lambda w: ["validate", _onnx(w), "digits-mlp", "--heldout", _two_inputs(w)], 10, "it takes input; given a, b"),
    "validate outputs differ": (lambda w: ["validate", _onnx(w), "digits-cnn"], 10, "does not match the PyTorch model"),
}


def _garbage(w: World, name: str, content: bytes = b"\x00\x01 this is not what it claims") -> Path:
    path = w.file(name)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, world, monkeypatch):
    build, code, message = CASES[case]
    args = build(world)
    before = {p.name for p in world.tmp.iterdir()}
    one_line_error(invoke(*args), code, message)
    after = {p.name for p in world.tmp.iterdir()}
    assert after - before <= {"__pycache__"}, f"{case} left {after - before}"
    assert not world.file("pwned").exists()


def test_disk_full_leaves_nothing(world, monkeypatch):
    _disk_full(monkeypatch)
    one_line_error(invoke("calibrate", "digits-cnn", "-o", world.out), 11, "the disk is full")
    assert not world.out.exists() and not list(world.tmp.glob(".*"))


def test_no_unsafe_loading_in_sources():
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in [*root.glob("actsparse_deploy/**/*.py"), *root.glob("tools/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ("torch.load(" in line and "weights_only=True" not in line) or "pickle.load" in line or "allow_pickle=True" in line:
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []


def test_onnx_metadata_is_plain_strings(world):
    dense = {p.key: p.value for p in onnx.load(str(_onnx(world))).metadata_props}
    assert json.loads(dense["actsparse_deploy.layers"]) == []  # no masks, no layers
    path = world.file("sparse.onnx")
    result = invoke("export", "digits-cnn", "--masks", _masks(world), "-o", path)
    assert result.exit_code == 0, result.output
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert all(type(value) is str for value in meta.values())
    assert {k: v for k, v in meta.items() if k != "actsparse_deploy.layers"} == {
        "actsparse_deploy.version": __version__, "actsparse_deploy.exporter": "torchscript", "actsparse_deploy.squash_mode": "auto",
    }
    layers = json.loads(meta["actsparse_deploy.layers"])
    assert [(row["layer"], row["mode"], row["sparsity"]) for row in layers] == [
        ("conv2", "fold", 0.125), ("fc1", "fold", 0.25), ("fc2", "prune", 0.5),
    ]
    assert layers[2]["reason"] == "removed 32 of 64 features from fc1 and this layer; compensated (lstsq): new weight and bias"
