"""Hostile .pt2 archives: each is a real program written by `actsparse squash`,
rewritten to carry a payload that would run code or write a file when loaded.
Every one goes through the real CLI (`export` and `validate`) and must be
refused with exit code 9 and one line on stderr, with no marker file made and
nothing written anywhere in the temporary tree. Programs the tool writes itself
still load, export and validate."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from actsparse_deploy.bake.pt2 import load_pt2
from actsparse_deploy.base.errors import ExportError, OutputError

from ..helpers import invoke, one_line_error

EXIT = ExportError.exit_code
SYMBOL = "Symbol('s77', positive=True, integer=True)"


class Touch:
    """A real pickle payload: unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def made(tmp_path_factory, digits_files) -> dict[str, Path]:
    """.pt2 files written by the tool (`actsparse calibrate` then `squash`, shared
    with the session: only read), with held-out data for validate."""
    root = tmp_path_factory.mktemp("made")
    out = {name: digits_files.pt2(name) for name in ("digits-mlp", "digits-cnn")}
    out["masks-mlp"] = digits_files.masks("digits-mlp")
    heldout = root / "heldout.npy"
    np.save(heldout, np.random.default_rng(0).normal(size=(8, 1, 8, 8)).astype(np.float32))
    out["heldout"] = heldout
    out["onnx"] = digits_files.pt2_onnx("digits-mlp")
    return out


# --- rewriting a real archive --------------------------------------------------------

Entries = list[tuple[str, bytes]]


def read_entries(path: Path) -> tuple[str, Entries]:
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    return entries[0][0].split("/")[0], entries


def write_entries(path: Path, entries: Entries) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some cases need
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for name, data in entries:
                archive.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data)
    return path


def member(root: str, entries: Entries, suffix: str) -> bytes:
    return next(data for name, data in entries if name == f"{root}/{suffix}")


def replace(root: str, entries: Entries, suffix: str, data: bytes) -> Entries:
    return [(n, data if n == f"{root}/{suffix}" else d) for n, d in entries]


def edit_model_json(root: str, entries: Entries, edit: Callable[[dict], None]) -> Entries:
    program = json.loads(member(root, entries, "models/model.json"))
    edit(program)
    return replace(root, entries, "models/model.json", json.dumps(program).encode())


def opaque_constant(root: str, entries: Entries, path_name: str, marker: Path) -> Entries:
    """Case 1: a pickled opaque object, referenced from the constants config."""
    config = {"config": {"obj": {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}}}
    entries = replace(root, entries, "data/constants/model_constants_config.json", json.dumps(config).encode())
    return entries + [(f"{root}/data/constants/{path_name}", pickle.dumps(Touch(marker)))]


def sympy_code(root: str, entries: Entries, marker: Path) -> Entries:
    """Case 2: a symbolic size that is a Python expression (sympify evaluates it)."""
    code = f"(__import__('os').system('touch {marker}'), {SYMBOL})[1]"
    text = member(root, entries, "models/model.json").decode()
    assert SYMBOL in text
    return replace(root, entries, "models/model.json", text.replace(f'"{SYMBOL}"', json.dumps(code)).encode())


def guards(root: str, entries: Entries, marker: Path) -> Entries:
    """Case 3: guards_code that ExportedProgram.module() turns into Python."""
    code = f"__import__('pathlib').Path({str(marker)!r}).touch() is None"
    return edit_model_json(root, entries, lambda p: p.__setitem__("guards_code", [code]))


def shared_library(tmp: Path, marker: Path) -> bytes:
    """Case 4: a .so whose constructor writes the marker (arbitrary bytes without a compiler)."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return b"\x7fELF" + os.urandom(256)
    source = tmp / "evil.c"
    source.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void evil(void) {\n"
        f'  FILE *f = fopen("{marker}", "w"); if (f) fclose(f);\n}}\n'
    )
    library = tmp / "evil.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    data = library.read_bytes()
    source.unlink()
    library.unlink()
    return data


def aoti_so(root: str, entries: Entries, marker: Path, tmp: Path) -> Entries:
    aoti = f"{root}/data/aotinductor/model"
    return entries + [
        (f"{aoti}/cevil.wrapper.so", shared_library(tmp, marker)),
        (f"{aoti}/cevil_metadata.json", json.dumps({"AOTI_DEVICE_KEY": "cpu"}).encode()),
    ]


def aoti_cpp(root: str, entries: Entries, marker: Path) -> Entries:
    """Case 5: AOTInductor sources whose compile flags name a shell command as the compiler."""
    aoti = f"{root}/data/aotinductor/model"
    flags = {"compiler": f"touch {marker};", "definitions": [], "include_dirs": [], "cflags": [], "ldflags": [],
             "libraries_dirs": [], "libraries": [], "passthrough_args": [], "aot_mode": True,
             "use_relative_path": False, "compile_only": True}
    return entries + [
        (f"{aoti}/cevil.wrapper.cpp", b"int main() { return 0; }\n"),
        (f"{aoti}/cevil.wrapper_compile_flags.json", json.dumps(flags).encode()),
        (f"{aoti}/cevil.wrapper_linker_flags.json", json.dumps({**flags, "compile_only": False}).encode()),
        (f"{aoti}/cevil.wrapper_metadata.json", json.dumps({"AOTI_DEVICE_KEY": "cpu"}).encode()),
    ]


def zip_slip(root: str, entries: Entries, outside: str) -> Entries:
    """Case 6: an AOTInductor member whose path climbs out of the extraction folder."""
    return entries + [(f"{root}/data/aotinductor/model/../../../../../{outside}", b"written outside")]


def placeholder_code(root: str, entries: Entries, marker: Path) -> Entries:
    """Beyond the issue's six: a graph input name is pasted into generated Python
    (`def forward(self, NAME)`); a default value there runs when the code is made."""
    evil = f"x=__import__('os').system('touch {marker}')"
    text = member(root, entries, "models/model.json").decode()
    assert '"x"' in text
    return replace(root, entries, "models/model.json", text.replace('"x"', json.dumps(evil)).encode())


def file_op(root: str, entries: Entries, marker: Path) -> Entries:
    """A graph node calling torch.save (or aten's file ops) with a path argument."""
    def edit(program: dict) -> None:
        node = program["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.save"
        node["inputs"] = [{"name": "obj", "arg": {"as_tensor": {"name": "x"}}, "kind": 1},
                          {"name": "f", "arg": {"as_string": str(marker)}, "kind": 1}]
    return edit_model_json(root, entries, edit)


def rename(root: str, entries: Entries, old: str, new: str) -> Entries:
    return [(f"{root}/{new}" if n == f"{root}/{old}" else n, d) for n, d in entries]


# id -> builder(root, entries, marker, tmp) -> entries
CASES: dict[str, Callable[[str, Entries, Path, Path], Entries]] = {
    "1 opaque object in a sub-folder": lambda r, e, m, t: opaque_constant(r, e, "opaque_obj_0/payload", m),
    "1 opaque object behind ..": lambda r, e, m, t: opaque_constant(r, e, "opaque_obj_0/../payload", m),
    "1 opaque object at its plain path": lambda r, e, m, t: opaque_constant(r, e, "opaque_obj_0", m),
    "1 custom object": lambda r, e, m, t: opaque_constant(r, e, "custom_obj_0", m),
    "1 pickled tensor constant": lambda r, e, m, t: opaque_constant(r, e, "tensor_9", m),
    "1 opaque object upper-case": lambda r, e, m, t: opaque_constant(r, e, "OPAQUE_OBJ_0", m),
    "2 sympy expression runs Python": lambda r, e, m, t: sympy_code(r, e, m),
    "3 guards_code": lambda r, e, m, t: guards(r, e, m),
    "4 AOTInductor shared library": lambda r, e, m, t: aoti_so(r, e, m, t),
    "5 AOTInductor compiler command": lambda r, e, m, t: aoti_cpp(r, e, m),
    "6 zip-slip": lambda r, e, m, t: zip_slip(r, e, m.name),
    "graph input name is Python": lambda r, e, m, t: placeholder_code(r, e, m),
    "graph calls torch.save": lambda r, e, m, t: file_op(r, e, m),
    "nested weight path": lambda r, e, m, t: rename(r, e, "data/weights/weight_0", "data/weights/sub/weight_0"),
    "dot-dot inside a member": lambda r, e, m, t: rename(r, e, "data/weights/weight_0", "data/weights/../weights/weight_0"),
    "upper-case member": lambda r, e, m, t: rename(r, e, "models/model.json", "models/MODEL.json"),
    "backslash in a member": lambda r, e, m, t: e + [(f"{r}\\data\\constants\\opaque_obj_0", pickle.dumps(Touch(m)))],
    "absolute member": lambda r, e, m, t: e + [(f"/{r}/extra/x.json", b"{}")],
    "extra member": lambda r, e, m, t: e + [(f"{r}/extra/notes.txt", b"hello")],
    "duplicate model.json": lambda r, e, m, t: sympy_code(r, e, m) + [(f"{r}/models/model.json", member(r, e, "models/model.json"))],
    "duplicate entry, same bytes": lambda r, e, m, t: e + [e[0]],
    "second root folder": lambda r, e, m, t: e + [("other/data/constants/opaque_obj_0", pickle.dumps(Touch(m)))],
}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Temporary files of torch (Python and C++) go to a deep private folder, so a
    zip-slip of five levels still lands inside tmp_path, where it is seen."""
    private = tmp_path / "a" / "b" / "c" / "d" / "tmp"
    private.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(private))
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("command", ["export", "validate"])
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_pt2_is_refused(case, command, made, sandbox):
    marker = sandbox / f"MARKER-{uuid.uuid4().hex}"
    root, entries = read_entries(made["digits-mlp"])
    hostile = write_entries(sandbox / "hostile.pt2", CASES[case](root, entries, marker, sandbox))
    before = tree(sandbox)
    if command == "export":
        result = invoke("export", hostile, "-o", sandbox / "out.onnx")
    else:
        result = invoke("validate", made["onnx"], hostile, "--heldout", made["heldout"])
    assert not marker.exists(), f"{case}: the payload ran"
    assert tree(sandbox) == before, f"{case}: wrote {tree(sandbox) - before}"
    for place in (Path(tempfile.gettempdir()), Path("/tmp"), Path.cwd()):
        assert not (place / marker.name).exists()
    line = one_line_error(result, EXIT)
    assert "refused" in line or "not a torch.export program" in line, f"{case}: {line}"


@pytest.mark.parametrize(
    "meta",
    [b"{not json", b'"a string"', b'{"inputs": 3}', b'{"inputs": ["x"], "outputs": [1]}',
     b'{"dynamic_axes": {"input": {"zero": "batch"}}, "inputs": ["input"], "outputs": ["o"]}',
     b'{"layers": [{"layer": 1}]}', b"[" * 100000 + b"]" * 100000, b"\xff\xfe"],
    ids=["not json", "not an object", "inputs not a list", "outputs not strings", "axis not an int",
         "layer row wrong", "deeply nested", "not utf-8"],
)
def test_malformed_actsparse_json(meta, made, tmp_path):
    root, entries = read_entries(made["digits-mlp"])
    bad = write_entries(tmp_path / "bad.pt2", replace(root, entries, "extra/actsparse.json", meta))
    for args in (["export", bad, "-o", tmp_path / "o.onnx"], ["validate", made["onnx"], bad, "--heldout", made["heldout"]]):
        one_line_error(invoke(*args), EXIT, "actsparse.json")
    assert not (tmp_path / "o.onnx").exists()


def test_programs_the_tool_writes_still_load(made, digits_files):
    for name in ("digits-mlp", "digits-cnn"):
        onnx_path = digits_files.pt2_onnx(name)  # `actsparse export PT2` exited 0
        result = invoke("validate", onnx_path, made[name])
        assert result.exit_code == 0 and "PASSED" in result.stdout, result.output
        assert result.stderr == ""


class Tokens(nn.Module):
    """A tiny sequence model with MiniLM's interface (input_ids and attention_mask
    in, token and pooled embeddings out, batch and sequence axes dynamic) whose
    program holds symbolic sizes beyond a bare symbol (a product from the reshape)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.embed(input_ids))
        h = h.reshape(-1, 3).reshape(input_ids.shape[0], -1, 3)
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return h * mask, (h * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _token_batch(batch: int, sequence: int) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, sequence, dtype=torch.int64)
    mask[0, sequence // 2 + 1 :] = 0  # padding
    return {"input_ids": torch.randint(1, 11, (batch, sequence)) * mask, "attention_mask": mask}


def test_dynamic_sequence_program_round_trip(tmp_path):
    from actsparse_deploy.bake.pt2 import load_pt2, save_pt2
    from actsparse_deploy.bake.squash import SquashResult
    from actsparse_deploy.data.iospec import IOSpec
    from actsparse_deploy.data.workload import Workload

    torch.manual_seed(0)
    model = Tokens().eval()
    batches = [_token_batch(2, n) for n in (5, 7)]
    axes = {0: "batch", 1: "sequence"}
    io_spec = IOSpec(("input_ids", "attention_mask"), ("tokens", "pooled"),
                     {"input_ids": axes, "attention_mask": axes, "tokens": axes, "pooled": {0: "batch"}})
    work = Workload("tokens", model, heldout=batches, io=io_spec)
    pt2 = tmp_path / "tokens.pt2"
    save_pt2(work, SquashResult(model, {}, {}, {}), pt2)
    program, meta = load_pt2(pt2)
    text = json.dumps(json.loads(zipfile.ZipFile(pt2).read("archive/models/model.json")))
    assert "Mul(" in text  # a real expression passed the grammar
    assert meta["inputs"] == ["input_ids", "attention_mask"] and meta["outputs"] == ["tokens", "pooled"]
    for batch in (_token_batch(3, 9), _token_batch(1, 2)):
        got = program.module()(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(got, model(**batch))
    np.savez(tmp_path / "ids.npz", **{k: v.numpy() for k, v in _token_batch(6, 8).items()})
    onnx_path = tmp_path / "tokens.onnx"
    result = invoke("export", pt2, "-o", onnx_path)
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(onnx_path))
    assert [o.name for o in proto.graph.output] == ["tokens", "pooled"]
    for graph_input in proto.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, graph_input.name
    result = invoke("validate", onnx_path, pt2, "--heldout", tmp_path / "ids.npz")
    assert result.exit_code == 0 and "PASSED" in result.stdout, result.output


def test_squash_disk_full_is_an_output_error(made, tmp_path, monkeypatch):
    """ENOSPC while the archive is written (a full disk cannot be caused here: the
    one mocked fault) is exit 11 with one line, and no partial file is left."""
    real_write_bytes = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if self.parent == tmp_path:  # the archive, written next to its final name
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "full.pt2"
    one_line_error(invoke("squash", "digits-mlp", "--masks", made["masks-mlp"], "-o", out), OutputError.exit_code, "the disk is full")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_squash_other_suffix_prints_no_torch_warning(made, tmp_path):
    """torch's logger writes to the process's stderr (not CliRunner's): a real
    process (also the test of `python -m actsparse_deploy` on success)."""
    import sys

    out = tmp_path / "x.bin"
    result = subprocess.run(
        [sys.executable, "-m", "actsparse_deploy", "squash", "digits-mlp", "--masks", str(made["masks-mlp"]), "-o", str(out), "--json"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
    assert {(row["layer"], row["mode"]) for row in json.loads(result.stdout)["layers"]} == {("fc2", "prune"), ("fc3", "prune")}
    program, meta = load_pt2(out)  # the other suffix holds the same program
    assert meta["model"] == "digits-mlp" and tuple(program.module()(torch.zeros(2, 1, 8, 8)).shape) == (2, 10)


def newer_schema(root: str, entries: Entries, marker: Path, tmp: Path) -> Entries:
    """Passes the allow-list; torch.export.load itself fails (and logs a traceback)."""
    return edit_model_json(root, entries, lambda p: p["schema_version"].__setitem__("major", 99))


@pytest.mark.slow
@pytest.mark.parametrize("build", [CASES["4 AOTInductor shared library"], newer_schema], ids=["aotinductor", "newer schema"])
def test_one_line_from_a_real_process(build, made, sandbox):
    """torch logs tracebacks to the process's stderr (not CliRunner's): a real process."""
    import sys

    root, entries = read_entries(made["digits-mlp"])
    hostile = write_entries(sandbox / "h.pt2", build(root, entries, sandbox / "MARKER", sandbox))
    result = subprocess.run(
        [sys.executable, "-m", "actsparse_deploy", "export", str(hostile), "-o", str(sandbox / "o.onnx")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    one_line_error(result, EXIT)
    assert not (sandbox / "MARKER").exists() and not (sandbox / "o.onnx").exists()


S50 = "Symbol('s50', positive=True, integer=True)"
ACCEPTED = [  # what torch writes for our programs (MiniLM's included), and a few more
    SYMBOL, f"Mul(Integer(384), {S50})", f"Mul(Integer(12), Pow({S50}, Integer(2)))", f"Add({SYMBOL}, Integer(-1))",
    f"FloorDiv({S50}, Integer(2))", f"Max(Integer(1), {SYMBOL})", f"StrictLessThan({SYMBOL}, Integer(513))",
    f"Mod(Mul({SYMBOL}, {S50}), Integer(8))",
]
REFUSED = [
    "__import__('os').system('true')", f"{SYMBOL}.__class__", "Symbol('s99', integer=True)", "Symbol('s77', evil=True)",
    f"Add({SYMBOL})", f"Pow({SYMBOL}, Integer(1000000))", f"Pow(Integer(2), {SYMBOL})", "Integer(1e3)", "Integer(1)+Integer(2)",
    f"Function('f')({SYMBOL})", f"Mul(Integer(2), {SYMBOL}) or 1", "lambda: 0", f"Mul(Integer(2), {SYMBOL}", "",
    "Symbol('s77\\')", "Float(1.5)", "Add(" * 70 + SYMBOL + ", Integer(1))" * 70,
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_size_grammar_accepts_integer_arithmetic(text):
    from actsparse_deploy.bake.pt2 import _check_expression

    _check_expression(text, {"s77", "s50"}, ExportError)


@pytest.mark.parametrize("text", REFUSED)
def test_size_grammar_refuses_anything_else(text):
    from actsparse_deploy.bake.pt2 import _check_expression

    with pytest.raises(ExportError, match="size expression"):
        _check_expression(text, {"s77", "s50"}, ExportError)


def test_saving_a_program_leaves_the_model_in_the_mode_it_was(tmp_path):
    """The program is captured in eval mode (dropout off); the caller's model keeps its own flags."""
    from actsparse_deploy.bake.pt2 import load_pt2, save_pt2
    from actsparse_deploy.bake.squash import SquashResult
    from actsparse_deploy.data.workload import Workload

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    work = Workload("drop", model, heldout=[torch.randn(4, 4)])
    save_pt2(work, SquashResult(model, {}, {}, {}), tmp_path / "drop.pt2")
    assert model.training and all(m.training for m in model.modules())
    program, _ = load_pt2(tmp_path / "drop.pt2")
    x = torch.randn(5, 4)
    torch.testing.assert_close(program.module()(x), model.eval()(x))  # no dropout in the program
