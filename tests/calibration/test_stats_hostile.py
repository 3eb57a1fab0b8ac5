"""Statistics files from anyone: what a file's metadata names is never run.

A statistics file records its model for display; `select` loads a built-in it
names, and anything else (a ``module:factory``, a Hugging Face directory) only
when the user passes it as ``--model``. Forged contents (shapes, names, counts,
dtypes) are refused on load with one line and exit 8; merging the same data
twice is refused with exit 7. Every file here is a real one with its metadata
rewritten, as :meth:`Statistics.save` writes it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from actsparse_deploy import Statistics

from ..helpers import invoke, one_line_error


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-mlp statistics of its default recipe (obs: the Gram matrix of fc2 and fc3)."""
    path = tmp_path_factory.mktemp("stats") / "p.stats.safetensors"
    result = invoke("calibrate", "digits-mlp", "--stats-only", "-o", path)
    assert result.exit_code == 0, result.output
    return path


def forge(source: Path, target: Path, metadata: dict[str, str] | None = None,
          edit: Callable[[list[dict[str, Any]], dict[str, torch.Tensor]], None] | None = None) -> Path:
    """``source`` written to ``target`` with ``metadata`` entries replaced and
    ``edit(rows, tensors)`` applied to the layer rows and the tensors."""
    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(source))
    rows = json.loads(meta["layers"])
    if edit is not None:
        edit(rows, tensors)
    meta.update(layers=json.dumps(rows), **(metadata or {}))
    save_file(tensors, str(target), metadata=meta)
    return target


# --- the model a file names is never imported -------------------------------------------------


def _evil_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``evil_factory.py`` in the current directory (``tmp_path``): importing it
    writes the returned marker, ``build()`` exits 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "evil_factory", raising=False)
    marker = tmp_path / "MARKER"
    (tmp_path / "evil_factory.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                              "def build():\n    raise SystemExit(0)\n")
    return marker


def test_a_factory_the_file_names_is_not_imported(real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, `select` imported evil_factory from the current directory and ran it."""
    marker = _evil_factory(tmp_path, monkeypatch)
    stats = forge(real, tmp_path / "evil.stats.safetensors", {"model": "evil_factory:build"})
    result = invoke("select", stats, "-o", tmp_path / "m.safetensors")
    one_line_error(result, 4, str(stats), "'evil_factory:build'", "--model")
    assert not marker.exists() and "evil_factory" not in sys.modules
    assert not (tmp_path / "m.safetensors").exists()


def test_a_file_naming_mkstemp_makes_no_file(real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    stats = forge(real, tmp_path / "mkstemp.stats.safetensors", {"model": "tempfile:mkstemp"})
    one_line_error(invoke("select", stats, "-o", tmp_path / "m.safetensors"), 4, "'tempfile:mkstemp'", "--model")
    assert list(temp.iterdir()) == []


def test_a_file_naming_sys_exit_is_an_error_not_a_silent_success(real: Path, tmp_path: Path) -> None:
    """Before: exit 0 with no output and no masks."""
    stats = forge(real, tmp_path / "exit.stats.safetensors", {"model": "sys:exit"})
    one_line_error(invoke("select", stats, "-o", tmp_path / "m.safetensors"), 4, "'sys:exit'", "not a built-in model")


@pytest.mark.slow
@pytest.mark.parametrize("payload", ["os:abort", "faulthandler:_sigsegv", "pdb:set_trace"])
def test_a_file_naming_a_crash_or_a_prompt_is_refused_in_a_real_process(real: Path, tmp_path: Path, payload: str) -> None:
    """Before: SIGABRT, SIGSEGV, and a debugger prompt waiting for input."""
    stats = forge(real, tmp_path / "crash.stats.safetensors", {"model": payload})
    done = subprocess.run([sys.executable, "-m", "actsparse_deploy", "select", str(stats), "-o", str(tmp_path / "m.safetensors")],
                          stdin=subprocess.PIPE, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    one_line_error(done, 4, repr(payload))
    assert not (tmp_path / "m.safetensors").exists()


def test_a_directory_the_file_names_is_not_read(real: Path, tmp_path: Path) -> None:
    directory = tmp_path / "model-dir"
    directory.mkdir()
    (directory / "config.json").write_text("{ not json")  # read, it would be another error
    for spec in (str(directory), f"hf:{directory}"):
        stats = forge(real, tmp_path / "dir.stats.safetensors", {"model": spec})
        one_line_error(invoke("select", stats, "-o", tmp_path / "m.safetensors"), 4, repr(spec), "--model")


def test_the_model_the_user_passes_is_loaded_and_must_match(real: Path, tmp_path: Path) -> None:
    """The same forged file with `--model`: the user's model is the one loaded, and
    its fingerprint decides; without a method, no model is needed at all."""
    stats = forge(real, tmp_path / "named.stats.safetensors", {"model": "evil_factory:build"})
    result = invoke("select", stats, "--model", "digits-mlp", "-o", tmp_path / "m.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "evil_factory:build"  # recorded, shown, never run
    one_line_error(invoke("select", stats, "--model", "digits-cnn", "-o", tmp_path / "c.safetensors"), 7, "digits-cnn",
             "not the model")


def test_another_builtin_model_is_not_the_one_the_statistics_are_of(real: Path, tmp_path: Path) -> None:
    """Before: AttributeError (DigitsCNN has no fc3), exit 1."""
    one_line_error(invoke("select", real, "--model", "digits-cnn", "-o", tmp_path / "m.safetensors"), 7,
             "digits-cnn is not the model the statistics")
    assert not (tmp_path / "m.safetensors").exists()


def test_nothing_else_acts_on_a_name_in_the_file(real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """merge and inspect read the forged file without importing what it names."""
    marker = _evil_factory(tmp_path, monkeypatch)
    a = forge(real, tmp_path / "a.stats.safetensors", {"model": "evil_factory:build"})
    assert invoke("inspect", a).exit_code == 8  # a statistics file is not a masks file
    invoke("merge", a, real, "-o", tmp_path / "merged.safetensors")
    assert not marker.exists() and "evil_factory" not in sys.modules


# --- forged contents: one line, exit 8, on load --------------------------------------------------


def _fc2(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return next(row for row in rows if row["layer"] == "fc2")


def _gram(shape: tuple[int, ...]) -> Callable[[list[dict[str, Any]], dict[str, torch.Tensor]], None]:
    def edit(rows: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        tensors["fc2"] = torch.zeros(shape, dtype=torch.float64)
        _fc2(rows)["stat_shape"] = list(shape)
    return edit


def _rename(new: str) -> Callable[[list[dict[str, Any]], dict[str, torch.Tensor]], None]:
    def edit(rows: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        _fc2(rows)["layer"] = new
        tensors[new] = tensors.pop("fc2")
    return edit


def _row(**values: Any) -> Callable[[list[dict[str, Any]], dict[str, torch.Tensor]], None]:
    def edit(rows: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        _fc2(rows).update(values)
    return edit


def _float32(rows: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
    tensors["fc2"] = tensors["fc2"].float()


FORGED = {
    "gram-129x128": (_gram((129, 128)), "fc2"),
    "gram-1d": (_gram((129,)), "fc2"),
    "gram-of-another-width": (_gram((65, 65)), "fc2"),  # fc2's input has 128 features
    "layer-with-control-characters": (_rename("fc2\x1b[2J\nerror: all fine"), "fc2\\x1b[2J\\nerror: all fine"),
    "layer-with-an-empty-part": (_rename("fc2..x"), "fc2..x"),
    "count-negative": (_row(count=-5), "fc2"),
    "count-nan": (_row(count=float("nan")), "fc2"),
    "count-float": (_row(count=5.0), "fc2"),
    "num-samples-negative": (_row(num_samples=-1), "fc2"),
    "input-shape-of-another-width": (_row(input_shape=[64]), "fc2"),
    "input-shape-empty": (_row(input_shape=[]), "fc2"),
    "input-dtype-odd": (_row(input_dtype="complex64"), "fc2"),
    "statistic-float32": (_float32, "fc2"),
    "aggregate-unknown": (_row(aggregate="evil_module:aggregate"), "fc2"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_statistics_are_refused_on_load(real: Path, tmp_path: Path, case: str) -> None:
    edit, layer = FORGED[case]
    stats = forge(real, tmp_path / "forged.stats.safetensors", edit=edit)
    result = invoke("select", stats, "-o", tmp_path / "m.safetensors")
    one_line_error(result, 8, f"statistics file {stats}", layer)
    assert not (tmp_path / "m.safetensors").exists()
    one_line_error(invoke("merge", real, stats, "-o", tmp_path / "merged.safetensors"), 8, f"statistics file {stats}", layer)


@pytest.mark.parametrize(("key", "value"), [("model", "digits-mlp\x1b[2J"), ("model", "x" * 5000), ("runs", '["not-an-id"]'),
                                            ("runs", "{}")])
def test_forged_file_metadata_is_refused_on_load(real: Path, tmp_path: Path, key: str, value: str) -> None:
    stats = forge(real, tmp_path / "forged.stats.safetensors", {key: value})
    one_line_error(invoke("select", stats, "-o", tmp_path / "m.safetensors"), 8, f"statistics file {stats}", key)


def test_a_layer_the_named_model_lacks_is_a_corrupted_file(real: Path, tmp_path: Path) -> None:
    """A layer name that fits the syntax but is not in the built-in model the file
    names (and is loaded): the file is corrupted. Before: AttributeError, exit 1."""
    stats = forge(real, tmp_path / "forged.stats.safetensors", edit=_rename("fc9"))
    one_line_error(invoke("select", stats, "-o", tmp_path / "m.safetensors"), 8, f"statistics file {stats}", "'fc9'", "digits-mlp")


# --- the same data twice ----------------------------------------------------------------------


def test_merging_the_same_data_twice_is_refused(real: Path, tmp_path: Path) -> None:
    """The file with itself, through a link, a byte-identical copy, a merge with
    one of its own parts: each would double the counts. Before: merged silently."""
    link, copy = tmp_path / "link.stats.safetensors", tmp_path / "copy.stats.safetensors"
    os.symlink(real, link)
    shutil.copyfile(real, copy)
    out = tmp_path / "merged.safetensors"
    one_line_error(invoke("merge", real, real, "-o", out), 7, "the same file")
    one_line_error(invoke("merge", real, link, "-o", out), 7, "the same file", str(link))
    one_line_error(invoke("merge", real, copy, "-o", out), 7, str(copy), "the same calibration run")
    assert not out.exists()
    again = tmp_path / "again.stats.safetensors"  # another run over the same data: the same statistics
    assert invoke("calibrate", "digits-mlp", "--stats-only", "-o", again).exit_code == 0
    one_line_error(invoke("merge", real, again, "-o", out), 7, str(again), "identical statistics")
    assert not out.exists()


def test_a_merge_with_one_of_its_own_parts_is_refused(tmp_path: Path) -> None:
    import numpy as np

    from actsparse_deploy.models.zoo import calibration_batches

    images = torch.cat(calibration_batches("digits-mlp")).numpy()
    parts = []
    for i, (start, stop) in enumerate(((0, 100), (100, 200))):
        np.save(tmp_path / f"shard{i}.npy", images[start:stop])
        parts.append(tmp_path / f"part{i}.stats.safetensors")
        assert invoke("calibrate", "digits-mlp", "--data", tmp_path / f"shard{i}.npy", "--stats-only", "-o", parts[-1]).exit_code == 0
    both = tmp_path / "both.stats.safetensors"
    assert invoke("merge", *parts, "-o", both).exit_code == 0
    assert len(Statistics.load(both).runs) == 2
    one_line_error(invoke("merge", both, parts[0], "-o", tmp_path / "m.safetensors"), 7, str(parts[0]), "the same calibration run")


# --- masks files: the same names, the same refusal ------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("layer", "fc2\x1b[2J\nerror: all fine"), ("layer", "fc2..x"), ("model", "digits-mlp\x07")])
def test_masks_files_with_names_that_are_none_are_refused(tmp_path: Path, field: str, value: str) -> None:
    masks = tmp_path / "m.safetensors"
    assert invoke("calibrate", "digits-mlp", "--sparsity", "0.5", "-o", masks).exit_code == 0
    with safe_open(str(masks), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(masks))
    if field == "model":
        meta["model"] = value
    else:
        rows = json.loads(meta["layers"])
        for key in [k for k in tensors if k == "fc2" or k.startswith("fc2::")]:
            tensors[key.replace("fc2", value, 1)] = tensors.pop(key)
        _fc2(rows)["layer"] = value
        meta["layers"] = json.dumps(rows)
    save_file(tensors, str(masks), metadata=meta)
    one_line_error(invoke("inspect", masks), 8, f"masks file {masks}", repr(value)[1:-1])
    one_line_error(invoke("squash", "digits-mlp", "--masks", masks, "-o", tmp_path / "m.pt2"), 8, f"masks file {masks}")
    assert not (tmp_path / "m.pt2").exists()


# --- what the tool writes, it reads ------------------------------------------------------------


class _Tokens(torch.nn.Module):
    """A Linear on (batch, tokens, features) and a conv on images: the two sample-axis layouts."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.fc(x).sum() + self.conv(image).sum()


@pytest.mark.parametrize("aggregate", ["sum", "sum_abs", "sum_sq", "max_abs", "moments", "gram"])
def test_statistics_of_every_aggregate_load_again(tmp_path: Path, aggregate: str) -> None:
    """The load-time check of a statistic against its input accepts what collect
    makes: every built-in aggregate, plain and per feature."""
    from actsparse_deploy import Recipe, collect

    torch.manual_seed(0)
    model = _Tokens()
    batches = [(torch.randn(2, 5, 6), torch.randn(2, 3, 4, 4)), (torch.randn(3, 5, 6), torch.randn(3, 3, 4, 4))]
    recipes = [Recipe.simple(layers=["fc", "conv"], sparsity=0.5, aggregate_fn=aggregate)]
    if aggregate not in ("moments", "gram"):
        per_feature = {"version": 1, "defaults": {"aggregate_fn": aggregate, "reduce_fn": "mean", "mask_fn": "topk",
                                                  "sparse_config": {"sparsity_level": 0.5}},
                       "layers": [{"name": ["fc"], "features": [0, 3], "feature_dim": -1},
                                  {"name": ["conv"], "features": [1], "feature_dim": 1}]}
        recipes.append(Recipe.from_dict(per_feature))
    for i, recipe in enumerate(recipes):
        stats = collect(model, recipe, batches)
        stats.save(tmp_path / f"{i}.safetensors")
        loaded = Statistics.load(tmp_path / f"{i}.safetensors")
        assert loaded.runs == stats.runs and loaded.values_digest() == stats.values_digest()


@pytest.mark.parametrize("name", ["blocks.a\xa0b", "blocks.\u3000x", "emoji.\U0001F469\u200d\U0001F52C", "caf\u00e9.fc"])
def test_names_a_module_can_have_round_trip_through_files(tmp_path: Path, name: str) -> None:
    """Module names may hold any character but a dot (no-break spaces, ideographic
    spaces, joined emoji): masks and statistics files of such layers load again, and
    a model named by such a path is only shown."""
    from actsparse_deploy import Masks
    from actsparse_deploy.calibration.fields import layer_name_in_file, model_name_in_file
    from actsparse_deploy.calibration.masks import LayerMask

    assert layer_name_in_file(name) == name and model_name_in_file(f"/models/{name}") == f"/models/{name}"
    path = tmp_path / "m.safetensors"
    Masks({name: LayerMask(torch.tensor([1.0, 0.0]))}, num_samples=2, model=f"dir/{name}").save(path)
    assert list(Masks.load(path).layers) == [name]


@pytest.mark.parametrize("name", ["a\x1b[31m", "a\rb", "a\nb", "a\u2028b", "a\x85b", "a..b", ""])
def test_names_with_control_characters_or_empty_parts_are_refused(name: str) -> None:
    from actsparse_deploy.base.errors import MaskError
    from actsparse_deploy.calibration.fields import layer_name_in_file

    with pytest.raises(MaskError, match="not a layer name"):
        layer_name_in_file(name)
