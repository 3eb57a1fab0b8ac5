"""The ``.pt2`` format: ``torch.export`` programs written by ``actsparse squash``,
read back without running anything the file holds.

A ``.pt2`` is a zip archive that ``torch.export.load`` turns into code: it
unpickles constants, hands size expressions to ``sympy.sympify`` (``eval``),
runs ``guards_code``, pastes names into generated Python, and loads or compiles
AOTInductor libraries. :func:`load_pt2` reads the file once into memory and
accepts only what ``torch.export.save`` writes for a program like ours
(:func:`check_pt2`); only then does ``torch.export.load`` see those same bytes,
with every ``torch.load`` forced to ``weights_only=True``.

    >>> import pathlib, tempfile, torch
    >>> from actsparse_deploy.bake.pt2 import load_pt2, write_program
    >>> program = torch.export.export(torch.nn.Linear(3, 2).eval(), (torch.ones(2, 3),))
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "linear.pt2"
    >>> write_program(program, path, {"model": "linear"})
    >>> loaded, meta = load_pt2(path)
    >>> meta["model"], tuple(loaded.module()(torch.ones(2, 3)).shape)
    ('linear', (2, 2))
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..base.errors import ExportError, first_line
from ..base.files import atomic_output, check_output_path
from ..base.version import __version__
from ..data.batches import as_positional, flatten_outputs, is_named, positional, run_batch
from ..data.iospec import IOSpec, PositionalAdapter
from ..nn.modules import eval_mode

if TYPE_CHECKING:
    from ..data.workload import Workload
    from .squash import SquashResult

__all__ = ["PT2_META", "as_positional", "check_pt2", "load_pt2", "pt2_io", "save_pt2", "write_program"]

PT2_META = "actsparse.json"

# --- writing -----------------------------------------------------------------------


def save_pt2(work: Workload, squashed: SquashResult, path: Path, overwrite: bool = False) -> None:
    """A ``torch.export`` program with the masks baked in (dynamic batch / sequence)."""
    check_output_path(path, overwrite)
    example = work.example()
    with eval_mode(squashed.model):  # captured in eval; the caller's flags come back after
        return _save_program(work, squashed, example, path, overwrite)


def _save_program(work: Workload, squashed: SquashResult, example: Any, path: Path, overwrite: bool) -> None:
    with torch.no_grad():
        n_outputs = len(flatten_outputs(run_batch(squashed.model, example)))
    io_spec = work.io or IOSpec.infer(example, n_outputs)  # the model's one spec: export and validation use it too
    module: nn.Module = squashed.model
    shapes: Any = io_spec.export_dynamic_shapes(named=False)
    if is_named(example):  # forward(*args) of the adapter: the dynamic shapes of its one var-positional argument
        module = PositionalAdapter(squashed.model, io_spec.input_names)
        shapes = (shapes,)
    args = positional(example, io_spec.input_names)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's advice to its own developers, not to our users
            program = torch.export.export(module.eval(), args, dynamic_shapes=shapes)
    except Exception as e:
        raise ExportError(f"torch.export cannot capture the squashed model: {type(e).__name__}: {first_line(e)}") from e
    meta = {
        "tool_version": __version__, "model": work.name, "inputs": list(io_spec.input_names), "outputs": list(io_spec.output_names),
        "dynamic_axes": {k: {str(a): d for a, d in v.items()} for k, v in io_spec.dynamic_axes.items()},
        "layers": squashed.report(),
    }
    write_program(program, path, meta, overwrite)


def write_program(program: torch.export.ExportedProgram, path: str | Path, meta: dict[str, Any], overwrite: bool = True) -> None:
    """Serialise in memory, then write the bytes through Python's file API inside
    :func:`atomic_output`: a full disk is an ``OutputError``, never a C++ abort,
    and no partial file is left. ``guards_code`` is not written (a loader refuses
    it as Python): ``.module()`` makes the same input checks from the program's
    range constraints."""
    program._guards_code = []
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _torch_logs():
        warnings.simplefilter("ignore")
        torch.export.save(program, buffer, extra_files={PT2_META: json.dumps(meta)})
    with atomic_output(Path(path), overwrite) as tmp:
        tmp.write_bytes(buffer.getvalue())


# --- reading -----------------------------------------------------------------------


def load_pt2(path: str | Path) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The program and the metadata this tool stored with it, from a file that
    passed :func:`check_pt2`. Anything else is an ``ExportError`` (exit code 9)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f".pt2 file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror or e}") from e
    meta = check_pt2(data, path)
    extra = {PT2_META: ""}
    with _weights_only_torch_load(), _torch_logs() as records:
        try:
            program = torch.export.load(io.BytesIO(data), extra_files=extra)
        except Exception as e:
            # torch.export.load logs the real error, then tries an old format and fails on that
            cause = next((r.exc_info[1] for r in records if r.exc_info and r.exc_info[1] is not None), e)
            raise ExportError(f"{path} is not a loadable torch.export program: {type(cause).__name__}: {first_line(cause)}") from e
    _check_loaded(program, path)
    return program, meta


def pt2_io(meta: dict[str, Any]) -> IOSpec | None:
    """The I/O spec stored with a .pt2 written by this tool."""
    if not meta.get("inputs"):
        return None
    axes = {k: {int(a): d for a, d in v.items()} for k, v in meta.get("dynamic_axes", {}).items()}
    return IOSpec(tuple(meta["inputs"]), tuple(meta["outputs"]), axes)


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """torch.export.load falls back to an unrestricted torch.load when the safe
    one fails; force weights_only=True for every load inside the block."""
    original = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


@contextlib.contextmanager
def _torch_logs() -> Iterator[list[logging.LogRecord]]:
    """Keep torch's log records (warnings with tracebacks, written straight to the
    process's stderr by handlers torch puts on its own loggers) off stderr:
    collected, so that a failure reports torch's own error in one line."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    loggers = [logging.getLogger("torch")] + [
        logger for name, logger in list(logging.root.manager.loggerDict.items())
        if name.startswith("torch.") and isinstance(logger, logging.Logger) and logger.handlers
    ]
    saved = [(logger, logger.handlers) for logger in loggers]
    for logger in loggers:
        logger.handlers = [keep]
    try:
        yield records
    finally:
        for logger, handlers in saved:
            logger.handlers = handlers


# --- the allow-list ----------------------------------------------------------------

# what torch.export.save writes for one program named "model", below the archive's folder
_MEMBERS = frozenset({
    "archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
    "models/model.json", "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json", "data/constants/model_constants_config.json",
    f"extra/{PT2_META}",
})
_REQUIRED = frozenset({
    "archive_format", "archive_version", "models/model.json", "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json", "data/constants/model_constants_config.json",
})
_INDEX = r"(?:0|[1-9][0-9]{0,5})"
_PAYLOADS = {"data/weights/": re.compile(rf"weight_{_INDEX}"), "data/constants/": re.compile(rf"tensor_{_INDEX}")}
_ROOT = re.compile(r"[A-Za-z0-9._-]{1,200}")
_MAX_JSON = 256 * 2**20


def check_pt2(data: bytes, path: str | Path) -> dict[str, Any]:
    """Refuse, with one ``ExportError``, a ``.pt2`` holding anything but what
    ``torch.export.save`` writes for a program like ours: members from a fixed
    list (exact, case-sensitive, no duplicates, no ``..``, no AOTInductor, no
    pickled objects), tensors stored raw, a ``model.json`` whose every string is
    a plain name, an aten op or a size expression of the strict grammar, and no
    ``guards_code``. Returns the metadata of ``extra/actsparse.json`` ({} without)."""
    where = str(path)

    def refuse(what: str) -> ExportError:
        return ExportError(f"{where} {what}, which is refused: a .pt2 may hold only what torch.export.save writes for a program")

    infos, root = _archive_listing(data, where, refuse)
    folded: set[str] = set()
    members = [_checked_member(info, root, folded, where, refuse) for info in infos]
    missing = sorted(_REQUIRED - set(members))
    if missing:
        raise ExportError(f"{where} is not a torch.export program: it lacks {', '.join(missing)}")
    read = _torch_reader(data, members, where)
    if read("archive_format") != b"pt2" or read("archive_version") != b"0":
        raise ExportError(f"{where} is not a torch.export program of archive version 0 (format pt2)")
    for config, directory in (("data/weights/model_weights_config.json", "data/weights/"),
                              ("data/constants/model_constants_config.json", "data/constants/")):
        _check_payload_config(_json(read(config), f"{where}: {config}"), directory, set(members), f"{where}: {config}", refuse)
    _check_program(_json(read("models/model.json"), f"{where}: models/model.json"), f"{where}: models/model.json", refuse)
    if f"extra/{PT2_META}" not in members:
        return {}
    return check_meta(read(f"extra/{PT2_META}"), f"{where}: extra/{PT2_META}")


def _archive_listing(data: bytes, where: str, refuse: Callable[[str], ExportError]) -> tuple[list[zipfile.ZipInfo], str]:
    """The zip's members, as Python's zip reader lists them, and the archive's folder (that of the first member,
    which torch's reader takes)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ExportError(f"{where} is not a torch.export program (.pt2 zip archive): {first_line(e)}") from e
    if not infos or "/" not in infos[0].filename:
        raise ExportError(f"{where} is not a torch.export program (.pt2 zip archive): no archive folder")
    root = infos[0].filename.split("/")[0]  # torch's reader takes the folder of the first member
    if not _ROOT.fullmatch(root) or root in (".", ".."):
        raise refuse(f"has an archive folder named {root!r}")
    return infos, root


def _checked_member(info: zipfile.ZipInfo, root: str, folded: set[str], where: str, refuse: Callable[[str], ExportError]) -> str:
    """One member's path below ``root``, once it is shown to be one ``torch.export.save`` writes, stored raw
    and not seen before (``folded``: the lower-cased paths so far, this one added)."""
    name = info.filename
    if not name.isascii() or not name.isprintable() or "\\" in name or name.startswith("/"):
        raise refuse(f"holds a member named {name!r} (not a plain relative path)")
    if not name.startswith(root + "/"):
        raise refuse(f"holds {name!r}, outside its archive folder {root!r}")
    rel = name[len(root) + 1 :]
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise refuse(f"holds {name!r} (an empty, '.' or '..' path component)")
    lowered = rel.lower()
    if "opaque_obj" in lowered or "custom_obj" in lowered:
        raise ExportError(
            f"{where} holds pickled Python objects ({name}), which are refused: loading them could run code"
        )
    if "aotinductor" in lowered:
        raise refuse(f"holds AOTInductor files ({name}: native code that loading would run or compile)")
    if lowered in folded:
        raise refuse(f"holds {name!r} twice (a duplicate zip entry)")
    folded.add(lowered)
    if not (rel in _MEMBERS or any(rel.startswith(d) and p.fullmatch(rel[len(d):]) for d, p in _PAYLOADS.items())):
        raise refuse(f"holds {name!r}")
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise refuse(f"holds {name!r} compressed or encrypted (torch.export.save stores members as they are)")
    return rel


def _torch_reader(data: bytes, members: list[str], where: str) -> Any:
    """The reader torch.export.load uses, on the same bytes: it must see exactly
    the members checked here (its zip parser is not Python's)."""
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = sorted(reader.get_all_records())
    except Exception as e:
        raise ExportError(f"{where} is not a torch.export program (.pt2 zip archive): {first_line(e)}") from e
    if records != sorted(members):
        raise ExportError(f"{where} lists different members to torch's zip reader than to Python's: refused")

    def read(member: str) -> bytes:
        try:
            return bytes(reader.get_record(member))
        except Exception as e:
            raise ExportError(f"{where}: member {member} cannot be read: {first_line(e)}") from e

    return read


def _json(raw: bytes, where: str) -> Any:
    if len(raw) > _MAX_JSON:
        raise ExportError(f"{where} is larger than {_MAX_JSON >> 20} MB: refused")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else first_line(e)
        raise ExportError(f"{where} is not valid JSON ({reason})") from e


# --- model.json and the payload configs ----------------------------------------------

_NAME = re.compile(r"(?:[A-Za-z0-9_-]{1,200}(?:\.[A-Za-z0-9_-]{1,200}){0,64})?")  # FX names, module paths, "" for the root
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
_SYMBOL = re.compile(r"[a-z]{1,8}[0-9]{1,9}")  # s77, u0: torch's size symbols
_VERSION = re.compile(r"[0-9A-Za-z.+_-]{1,64}")
# strings torch never turns into code: kept as text (FX writes them as repr or as comments)
_TEXT_FIELDS = frozenset({"stack_trace", "nn_module_stack", "torch_fn", "source_fn_stack", "as_string", "as_strings"})
_NODE_METADATA = frozenset({"stack_trace", "nn_module_stack", "torch_fn", "source_fn_stack"})
_PROGRAM_KEYS = frozenset({"graph_module", "opset_version", "range_constraints", "schema_version", "verifiers", "torch_version", "guards_code"})
_REFUSED_KEYS = {
    "as_graph": "a sub-graph (higher-order op)",
    "as_custom_obj": "a custom object argument",
    "custom_obj": "a custom object input",
    "as_sym_float": "a symbolic float",
}
_SYM_OPS = frozenset({
    *(f"_operator.{op}" for op in ("add", "sub", "mul", "floordiv", "mod", "neg", "pos", "eq", "ne", "lt", "le", "gt", "ge",
                                   "truediv", "pow", "and_", "or_", "lshift", "rshift")),
    *(f"torch.sym_{op}" for op in ("not", "int", "float", "ite", "max", "min", "sqrt")),
    "math.trunc",
})
_ATEN = re.compile(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]{0,100})\.([A-Za-z_][A-Za-z0-9_]{0,100})")
_LEAF: dict[str, Any] = {"type": None, "context": None, "children_spec": []}


def _check_payload_config(config: Any, directory: str, members: set[str], where: str, refuse: Any) -> None:
    """Every weight / constant a raw tensor of an allow-listed member (never a pickle)."""
    if not isinstance(config, dict) or set(config) != {"config"} or not isinstance(config["config"], dict):
        raise ExportError(f"{where} is not a torch.export payload config")
    pattern = _PAYLOADS[directory]
    for fqn, entry in config["config"].items():
        if not _NAME.fullmatch(fqn) or not isinstance(entry, dict):
            raise refuse(f"names a tensor {fqn!r}")
        path_name = entry.get("path_name")
        if not isinstance(path_name, str) or not pattern.fullmatch(path_name) or directory + path_name not in members:
            raise refuse(f"points {fqn!r} at {path_name!r}")
        if entry.get("use_pickle") is not False or not isinstance(entry.get("tensor_meta"), dict):
            raise refuse(f"stores {fqn!r} as a pickle")
        _walk(entry, "", (), set(), where, refuse)


def _check_program(program: Any, where: str, refuse: Any) -> None:
    if not isinstance(program, dict) or "graph_module" not in program or not isinstance(program["graph_module"], dict):
        raise ExportError(f"{where} is not a serialized torch.export program")
    unknown = sorted(set(program) - _PROGRAM_KEYS)
    if unknown:
        raise refuse(f"has unknown fields {', '.join(map(repr, unknown))}")
    if program.get("guards_code", []) != []:
        raise refuse("holds guards_code (Python that ExportedProgram.module() would run; `actsparse squash` writes none: squash again)")
    ranges = program.get("range_constraints", {})
    if not isinstance(ranges, dict):
        raise ExportError(f"{where}: range_constraints is not an object")
    for symbol, bounds in ranges.items():
        if not _SYMBOL.fullmatch(symbol) or not isinstance(bounds, dict) or set(bounds) - {"min_val", "max_val"} or any(
            not (v is None or type(v) is int) for v in bounds.values()
        ):
            raise refuse(f"declares a size symbol {symbol!r}: {bounds!r}")
    graph = program["graph_module"].get("graph")
    if not isinstance(graph, dict):
        raise ExportError(f"{where} has no graph")
    if graph.get("custom_obj_values"):
        raise ExportError(f"{where} holds pickled Python objects (custom objects), which are refused: loading them could run code")
    for value in graph.get("inputs", []):
        if not isinstance(value, dict) or set(value) != {"as_tensor"}:
            raise refuse(f"takes a graph input that is not a tensor ({str(value)[:80]})")
    for entry in program["graph_module"].get("module_call_graph", []):
        signature = entry.get("signature") if isinstance(entry, dict) else None
        if signature is not None and not isinstance(signature, dict):
            raise refuse("has a module call graph entry that is not a signature")
        if signature:
            _check_spec(signature.get("in_spec"), inputs=True, where=where, refuse=refuse)
            _check_spec(signature.get("out_spec"), inputs=False, where=where, refuse=refuse)
    _walk(program, "", (), set(ranges), where, refuse)


def _check_spec(text: Any, inputs: bool, where: str, refuse: Any) -> None:
    """The call spec of the program: positional tensors in (no keyword arguments,
    whose names would be pasted into Python), tensors in tuples / lists / dicts out."""
    try:
        version, spec = json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:
        raise refuse(f"has a call spec that is not a pytree spec ({first_line(e)})") from e
    if version != 1:
        raise refuse(f"has a call spec of version {version!r}")
    if inputs:
        tuple_of = {"type": "builtins.tuple", "context": "null"}
        ok = (
            isinstance(spec, dict) and {k: spec.get(k) for k in tuple_of} == tuple_of and len(spec.get("children_spec", [])) == 2
            and {k: spec["children_spec"][0].get(k) for k in tuple_of} == tuple_of
            and all(leaf == _LEAF for leaf in spec["children_spec"][0].get("children_spec", [None]))
            and spec["children_spec"][1] == {"type": "builtins.dict", "context": "[]", "children_spec": []}
        )
        if not ok:
            raise refuse("takes inputs other than positional tensors")
        return

    def output(node: Any, depth: int = 0) -> bool:
        if node == _LEAF:
            return True
        if depth > 16 or not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
            return False
        children = node["children_spec"]
        if node["type"] in ("builtins.tuple", "builtins.list") and node["context"] == "null":
            pass
        elif node["type"] == "builtins.dict" and isinstance(node["context"], str):
            try:
                keys = json.loads(node["context"])
            except (ValueError, RecursionError):
                return False
            if not isinstance(keys, list) or not all(isinstance(k, str) and _NAME.fullmatch(k) for k in keys):
                return False
        else:
            return False
        return isinstance(children, list) and all(output(c, depth + 1) for c in children)

    if not output(spec):
        raise refuse("returns something other than tensors in tuples, lists or dicts")


def _walk(value: Any, key: str, path: tuple[str, ...], symbols: set[str], where: str, refuse: Any) -> None:
    """Every string of the program by what torch does with it: a size expression
    (``expr_str``, to sympify) must pass the grammar, an op (``target``) must be
    aten or a symbolic-int op, text fields must be free of control characters,
    and everything else (node names, module paths, keys) must be a plain name."""
    if len(path) > 64:
        raise refuse("nests deeper than a torch.export program does")
    if isinstance(value, dict):
        if key == "metadata" and set(value) - _NODE_METADATA:
            raise refuse(f"has node metadata {sorted(set(value) - _NODE_METADATA)!r}")
        for k, v in value.items():
            if not _KEY.fullmatch(k):
                raise refuse(f"has a field named {k!r} at {'/'.join(path) or 'the top'}")
            if k in _REFUSED_KEYS:
                raise refuse(f"holds {_REFUSED_KEYS[k]} at {'/'.join(path)}")
            _walk(v, k, path + (k,), symbols, where, refuse)
    elif isinstance(value, list):
        for item in value:
            _walk(item, key, path + ("[]",), symbols, where, refuse)
    elif isinstance(value, str):
        if key == "expr_str":
            _check_expression(value, symbols, refuse)
        elif key == "target":
            _check_target(value, refuse)
        elif key in _TEXT_FIELDS or key in ("in_spec", "out_spec"):
            allowed_newline = key == "stack_trace"
            if len(value) > 100_000 or any((c < " " and not (allowed_newline and c == "\n")) or "\x7f" <= c <= "\x9f" for c in value):
                raise refuse(f"has control characters or a huge text in a {key!r} field")
        elif key == "torch_version":
            if not _VERSION.fullmatch(value):
                raise refuse(f"has a torch_version of {value[:80]!r}")
        elif not _NAME.fullmatch(value):
            raise refuse(f"has a {key!r} of {value[:80]!r} (not a plain name)")
    elif not (value is None or isinstance(value, (bool, int, float))):
        raise refuse(f"has a value of type {type(value).__name__}")


def _check_target(target: str, refuse: Any) -> None:
    if target in _SYM_OPS:
        return
    match = _ATEN.fullmatch(target)
    if match is None:
        raise refuse(f"calls {target[:80]!r} (only aten ops and symbolic-size ops are allowed)")
    try:
        op = getattr(getattr(torch.ops.aten, match.group(1)), match.group(2))
        arguments = op._schema.arguments
    except (AttributeError, RuntimeError) as e:
        raise refuse(f"calls {target!r}, which is not an aten op of this torch") from e
    if any(re.search("file|path", a.name) and "str" in str(a.type) for a in arguments):
        raise refuse(f"calls {target!r}, which reads or writes files")


# --- size expressions ----------------------------------------------------------------

# sympy's srepr of integer size arithmetic, as torch writes it: Symbol('s77', positive=True,
# integer=True), Integer(12), Mul(...), Pow(..., Integer(2)), FloorDiv(...), Eq(...)
_FUNCTIONS = {
    "Add": (2, 64), "Mul": (2, 64), "Max": (2, 64), "Min": (2, 64), "And": (2, 64), "Or": (2, 64), "Not": (1, 1),
    "FloorDiv": (2, 2), "CeilDiv": (2, 2), "CleanDiv": (2, 2), "Mod": (2, 2), "PythonMod": (2, 2), "Pow": (2, 2),
    "Equality": (2, 2), "Unequality": (2, 2), "StrictLessThan": (2, 2), "LessThan": (2, 2),
    "StrictGreaterThan": (2, 2), "GreaterThan": (2, 2),
}
_ASSUMPTIONS = frozenset({"positive", "nonnegative", "negative", "nonpositive", "integer", "real", "finite", "nonzero",
                          "extended_real", "extended_positive", "extended_nonnegative"})
_TOKEN = re.compile(r"\s*(?:(?P<int>-?[0-9]{1,30})|(?P<str>'[^']{0,64}')|(?P<name>[A-Za-z_][A-Za-z0-9_]{0,63})|(?P<punct>[(),=]))")
_MAX_EXPRESSION = 4096


def _check_expression(text: str, symbols: set[str], refuse: Any) -> None:
    """Parse ``text`` with the integer-arithmetic grammar above over the declared
    symbols; sympify (an ``eval``) sees only strings this accepts."""

    def bad(why: str) -> ExportError:
        return refuse(f"has a size expression {text[:100]!r} ({why})")

    if len(text) > _MAX_EXPRESSION:
        raise bad("too long")
    parser = _ExpressionParser(_expression_tokens(text, bad), symbols, bad)
    parser.expression(0)
    parser.take("end")


def _expression_tokens(text: str, bad: Callable[[str], ExportError]) -> list[tuple[str, str]]:
    """``text``'s tokens (kind, text), then ``("end", "")``; anything else in it is ``bad``."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            if text[pos:].strip() == "":
                break
            raise bad(f"unexpected {text[pos:pos + 20]!r}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    tokens.append(("end", ""))
    return tokens


class _ExpressionParser:
    """A recursive-descent reader of size expression tokens: ``Integer(n)``,
    ``Symbol('s', assumption=True, ...)`` of a declared symbol, or one of
    :data:`_FUNCTIONS` of its number of arguments; anything else is ``bad``."""

    def __init__(self, tokens: list[tuple[str, str]], symbols: set[str], bad: Callable[[str], ExportError]) -> None:
        self.tokens, self.symbols, self.bad, self.at = tokens, symbols, bad, 0

    def take(self, kind: str, value: str | None = None) -> str:
        got_kind, got = self.tokens[self.at]
        if got_kind != kind or (value is not None and got != value):
            raise self.bad(f"expected {value or kind}, got {got or 'the end'!r}")
        self.at += 1
        return got

    def _next_is(self, token: tuple[str, str]) -> bool:
        return self.tokens[self.at] == token

    def expression(self, depth: int) -> tuple[str, int | None]:
        """One expression: its function's name, and its value where it is an ``Integer``."""
        if depth > 64:
            raise self.bad("nested too deeply")
        name = self.take("name")
        self.take("punct", "(")
        if name == "Integer":
            number = int(self.take("int"))
            self.take("punct", ")")
            return name, number
        if name == "Symbol":
            self._symbol()
            return name, None
        if name not in _FUNCTIONS:
            raise self.bad(f"{name} is not integer arithmetic")
        low, high = _FUNCTIONS[name]
        args = [self.expression(depth + 1)]
        while self._next_is(("punct", ",")):
            self.take("punct", ",")
            args.append(self.expression(depth + 1))
        self.take("punct", ")")
        if not low <= len(args) <= high:
            raise self.bad(f"{name} takes {low} to {high} arguments")
        if name == "Pow" and not (args[1][0] == "Integer" and 0 <= (args[1][1] or 0) <= 64):
            raise self.bad("a power must be a small non-negative integer")
        return name, None

    def _symbol(self) -> None:
        """The rest of ``Symbol(``: a declared symbol's name, its assumptions, ``)``."""
        symbol = self.take("str")[1:-1]
        if symbol not in self.symbols:
            raise self.bad(f"symbol {symbol!r} is not declared in range_constraints")
        while self._next_is(("punct", ",")):
            self.take("punct", ",")
            assumption = self.take("name")
            self.take("punct", "=")
            if assumption not in _ASSUMPTIONS or self.take("name") not in ("True", "False"):
                raise self.bad(f"assumption {assumption!r}")
        self.take("punct", ")")


def _check_loaded(program: torch.export.ExportedProgram, path: Path) -> None:
    """What the loaded program must look like before anything calls ``.module()``."""
    if getattr(program, "_guards_code", []):
        raise ExportError(f"{path} holds guards_code, which is refused")
    example = program.example_inputs
    if example is not None:
        args, kwargs = example if isinstance(example, tuple) and len(example) == 2 else (None, None)
        if kwargs or not isinstance(args, tuple) or not all(isinstance(a, torch.Tensor) for a in args):
            raise ExportError(f"{path} has example inputs other than positional tensors, which are refused")
    for name, value in {**program.state_dict, **program.constants}.items():
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"{path} holds a constant {name!r} of type {type(value).__name__}, which is refused")


# --- actsparse.json -----------------------------------------------------------------

_META_TYPES: dict[str, Any] = {"tool_version": str, "model": str, "inputs": list, "outputs": list, "dynamic_axes": dict, "layers": list}
_ROW_TYPES: dict[str, Any] = {"layer": str, "mode": str, "reason": str, "sparsity": (int, float)}


def check_meta(raw: bytes, where: str) -> dict[str, Any]:
    """The metadata this tool writes, every field of the type it writes; an
    ``ExportError`` naming the field otherwise (never a crash later)."""
    meta = _json(raw, where)

    def bad(why: str) -> ExportError:
        return ExportError(f"{where} is not this tool's metadata: {why}")

    def text(value: Any) -> bool:
        return isinstance(value, str) and len(value) <= 1000 and value.isprintable()

    if not isinstance(meta, dict):
        raise bad(f"a JSON {type(meta).__name__}, not an object")
    for key, value in meta.items():
        if key not in _META_TYPES:
            raise bad(f"unknown field {key!r}")
        if not isinstance(value, _META_TYPES[key]) or isinstance(value, bool):
            raise bad(f"{key} is a {type(value).__name__}, not a {_META_TYPES[key].__name__}")
    if ("inputs" in meta) != ("outputs" in meta):
        raise bad("inputs and outputs go together")
    for key in ("tool_version", "model"):
        if key in meta and not text(meta[key]):
            raise bad(f"{key} is not a line of text")
    for key in ("inputs", "outputs"):
        if not all(text(name) for name in meta.get(key, [])):
            raise bad(f"{key} must be a list of names")
    for name, axes in meta.get("dynamic_axes", {}).items():
        if not text(name) or not isinstance(axes, dict) or not all(
            isinstance(a, str) and a.isdigit() and len(a) < 4 and text(d) for a, d in axes.items()
        ):
            raise bad(f"dynamic_axes of {name!r} must map axis numbers to names")
    for row in meta.get("layers", []):
        if not isinstance(row, dict) or set(row) != set(_ROW_TYPES) or not all(
            isinstance(row[k], t) and not isinstance(row[k], bool) for k, t in _ROW_TYPES.items()
        ) or not all(text(row[k]) for k in ("layer", "mode", "reason")):
            raise bad(f"a layer row must have layer, mode, reason (text) and sparsity (a number): {str(row)[:80]}")
    return meta
