"""Errors from outside the tool's own code, option bounds, and notes that travel with statistics.

A Rust panic (``pyo3_runtime.PanicException``, a ``BaseException``) is one line:
exit 1 where nothing knows its cause, the file's class where a ``.safetensors``
file was being read (weights 5, data 6, masks / statistics / sparsifier state 8),
as are torch's errors on a header it cannot take. Safetensors 0.8 answers every
malformed header tried (huge or overlapping offsets, unknown dtypes, a header
length past the file, non-UTF-8 or nested metadata, deep JSON) with its own
error, never a panic: the panics here are real ones, made by the tokenizers
library, raised where safetensors is called. Every count option has bounds,
checked before any work (exit 2). The layers a collection skipped are saved in
the statistics file, so ``--stats-only`` then ``select`` (or ``merge``) keeps
the notes ``calibrate`` writes."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from actsparse_deploy import Statistics
from actsparse_deploy.base.errors import DataError, MaskError

from ..helpers import UserFolder, invoke, one_line_error, user_module, user_module_source

#: a pre-tokenizer regex whose match on "aaa...b" exceeds oniguruma's retry limit: the tokenizers library panics
PANIC_REGEX = "(a|a)*$"


@pytest.fixture(scope="module")
def panic() -> BaseException:
    """A real ``pyo3_runtime.PanicException``, from a tokenizer that panics (its report on stderr held back)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from actsparse_deploy.data.streams import is_panic, run_tokenizer

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PANIC_REGEX), "isolated")
    with pytest.raises(DataError) as info:
        run_tokenizer(lambda: tokenizer.encode("a" * 500 + "b"), lambda e: DataError("panicked"))
    error = info.value.__cause__
    assert error is not None and is_panic(error) and not isinstance(error, Exception)
    return error


def _raising(error: BaseException) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise type(error)(str(error))

    return fail


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32))
    with user_module(tmp_path, user_module_source(), monkeypatch) as name:
        yield UserFolder(tmp_path, name)


def _calibrate(user: UserFolder, *args: object) -> list[object]:
    return ["calibrate", user.user(), "--data", "calib.npy", "--layers", "fc2", "--sparsity", "0.5", "-o", "m.safetensors", *args]


# --- a panic anywhere: one line, exit 1 ----------------------------------------------------------


def test_a_panic_in_a_command_is_one_line_exit_1(panic: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy.models import zoo

    monkeypatch.setattr(zoo, "builtin_names", _raising(panic))
    line = one_line_error(invoke("models"), 1, "PanicException", str(panic)[:20], start="internal error: ")
    assert "--verbose" in line


def test_a_panic_outside_a_command_is_one_line_exit_1(panic: BaseException, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from actsparse_deploy.app import cli

    monkeypatch.setattr(cli, "app", _raising(panic))
    assert cli._run_app() == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "internal error" in err and "PanicException" in err, err


# --- a panic while a .safetensors file is read: the file's class ---------------------------------


def _saved(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_a_panic_reading_weights_is_a_weights_error(panic: BaseException, user: UserFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy.models import loading

    weights = _saved(user.file("w.safetensors"), {k: v.contiguous() for k, v in torch.nn.Linear(1, 1).state_dict().items()})
    monkeypatch.setattr(loading, "safe_open", _raising(panic))  # the file is opened a tensor at a time
    one_line_error(invoke(*_calibrate(user, "--weights", weights)), 5, "w.safetensors", "PanicException")
    assert not user.file("m.safetensors").exists()


def test_a_panic_reading_builtin_weights_is_a_weights_error(panic: BaseException, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from actsparse_deploy.models import zoo

    monkeypatch.setattr(zoo, "load_file", _raising(panic))
    one_line_error(invoke("calibrate", "digits-mlp", "-o", tmp_path / "m.safetensors"), 5, "digits-mlp", "PanicException")
    monkeypatch.setattr(zoo, "safe_open", _raising(panic))
    one_line_error(invoke("models"), 5, "digits", "PanicException")


def test_a_panic_reading_data_is_a_data_error(panic: BaseException, user: UserFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors

    data = _saved(user.file("calib.safetensors"), {"x": torch.randn(12, 4)})
    monkeypatch.setattr(safetensors, "safe_open", _raising(panic))  # opened where it is used: `from safetensors import safe_open`
    args = ["calibrate", user.user(), "--data", data, "--layers", "fc2", "--sparsity", "0.5", "-o", "m.safetensors"]
    one_line_error(invoke(*args), 6, "calib.safetensors", "PanicException")


def test_a_panic_reading_data_rows_is_a_data_error(panic: BaseException, user: UserFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy.data.streams import _File

    data = _saved(user.file("calib.safetensors"), {"x": torch.randn(12, 4)})
    monkeypatch.setattr(_File, "_safetensors_rows", _raising(panic))
    args = ["calibrate", user.user(), "--data", data, "--layers", "fc2", "--sparsity", "0.5", "-o", "m.safetensors"]
    one_line_error(invoke(*args), 6, "calib.safetensors", "PanicException")


def test_a_panic_reading_masks_statistics_or_a_state_is_a_masks_error(panic: BaseException, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy import ActivationSparsifier
    from actsparse_deploy.base import serialize

    masks, stats = tmp_path / "m.safetensors", tmp_path / "s.safetensors"
    assert invoke("calibrate", "digits-mlp", "-o", masks).exit_code == 0
    assert invoke("calibrate", "digits-mlp", "--stats-only", "-o", stats).exit_code == 0
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    sparsifier = ActivationSparsifier(model, "sum_abs", "mean", "threshold", threshold=0.1)
    sparsifier.register_layer(model[0])
    model(torch.ones(2, 3))
    sparsifier.save(tmp_path / "state.safetensors")
    monkeypatch.setattr(serialize, "load_file", _raising(panic))
    one_line_error(invoke("inspect", masks), 8, "m.safetensors", "PanicException")
    one_line_error(invoke("select", stats, "-o", tmp_path / "out.safetensors"), 8, "s.safetensors", "PanicException")
    one_line_error(invoke("merge", stats, "-o", tmp_path / "merged.safetensors"), 8, "s.safetensors", "PanicException")
    with pytest.raises(MaskError, match="state.safetensors"):
        sparsifier.load(tmp_path / "state.safetensors")
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "merged.safetensors").exists()


def test_a_panic_reading_a_hugging_face_directory_is_a_weights_error(panic: BaseException, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=16)).save_pretrained(tmp_path / "bert")
    monkeypatch.setattr(safetensors, "safe_open", _raising(panic))  # the header read before the model is built
    one_line_error(invoke("inspect", tmp_path / "bert"), 5, "bert", "PanicException")


def test_a_panic_inside_transformers_loading_is_a_weights_error(panic: BaseException, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=16)).save_pretrained(tmp_path / "bert")
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", _raising(panic))
    one_line_error(invoke("inspect", tmp_path / "bert"), 5, "bert", "PanicException")



def test_a_panic_loading_a_builtin_language_model_is_its_files_class(panic: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny-lm's and MiniLM's own loaders: the weights (exit 5), the tokenizer file (exit 4, as its other errors)."""
    import safetensors.torch
    import tokenizers
    import transformers

    from actsparse_deploy.base.errors import ModelLoadError, WeightsError
    from actsparse_deploy.models import minilm, tinylm

    with monkeypatch.context() as patched:
        patched.setattr(safetensors.torch, "load_file", _raising(panic))
        with pytest.raises(WeightsError, match="PanicException"):
            tinylm.load_tiny_lm()
        patched.setattr(transformers.BertModel, "from_pretrained", _raising(panic))
        with pytest.raises(WeightsError, match="PanicException"):
            minilm.load_minilm()

    # MiniLM's first: transformers imports its tokenizer modules on first use, and one imported
    # while tokenizers.Tokenizer is the stand-in below would keep it for the rest of the process
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _raising(panic))
    with pytest.raises(ModelLoadError, match="MiniLM tokenizer .*PanicException"):
        minilm.get_tokenizer.__wrapped__()

    class Panicking:
        from_file = staticmethod(_raising(panic))

    monkeypatch.setattr(tokenizers, "Tokenizer", Panicking)
    with pytest.raises(ModelLoadError, match="tiny-lm tokenizer .*PanicException"):
        tinylm._tokenizer_at.__wrapped__(tinylm.models_dir() / tinylm.TOKENIZER_FILENAME)

# --- malformed headers that torch cannot take: the file's class, not an internal error -----------


def _raw(path: Path, header: dict[str, Any], data: bytes = b"") -> Path:
    """A .safetensors file with this header, written byte by byte (safetensors' writer would refuse it)."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


#: headers safetensors accepts and torch then refuses: a dimension past int64 (TypeError), a sub-byte dtype
#: whose bytes do not fill its shape (RuntimeError)
HEADERS = {
    "dimension past int64": ({"fc1.weight": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}, b""),
    "sub-byte shape": ({"fc1.weight": {"dtype": "F4", "shape": [4, 2], "data_offsets": [0, 4]}}, b"\0" * 4),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_a_header_torch_cannot_take_is_the_files_class(case: str, user: UserFolder) -> None:
    header, data = HEADERS[case]
    bad = _raw(user.file("bad.safetensors"), header, data)
    one_line_error(invoke(*_calibrate(user, "--weights", bad)), 5, "bad.safetensors")
    one_line_error(invoke("inspect", bad), 8, "bad.safetensors")
    one_line_error(invoke("select", bad, "-o", "out.safetensors"), 8, "bad.safetensors")
    renamed = {"x": header["fc1.weight"]}
    data_file = _raw(user.file("data.safetensors"), renamed, data)
    args = ["calibrate", user.user(), "--data", data_file, "--layers", "fc2", "--sparsity", "0.5", "-o", "m.safetensors"]
    one_line_error(invoke(*args), 6, "data.safetensors")
    assert not user.file("m.safetensors").exists() and not user.file("out.safetensors").exists()


# --- count options: bounded, refused before any work --------------------------------------------


@pytest.mark.parametrize("runs", ["0", "1001", "99999999999999999999"])
def test_sweep_runs_out_of_bounds_is_a_usage_error(runs: str, tmp_path: Path) -> None:
    one_line_error(invoke("sweep", "digits-mlp", "-o", tmp_path / "sw", "--runs", runs), 2, "--runs")
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("runs", [0, 1001, True, 2.5])
def test_sweep_runs_out_of_bounds_in_the_library(runs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy.app import workload
    from actsparse_deploy.app.sweep import sweep
    from actsparse_deploy.base.errors import UsageError

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the workload was loaded before the runs were checked")

    monkeypatch.setattr(workload, "load_workload", never)
    with pytest.raises(UsageError, match="runs"):
        sweep("digits-mlp", tmp_path / "sw", levels=[0.5], runs=runs)
    assert not (tmp_path / "sw").exists()


#: command -> options: each value out of its bounds
BOUNDS = [
    ("calibrate", "--batch-size", "0"), ("calibrate", "--batch-size", "2147483648"),
    ("calibrate", "--max-samples", "0"), ("calibrate", "--max-samples", "99999999999999999999"),
    ("calibrate", "--threads", "0"), ("calibrate", "--threads", "1025"),
    ("calibrate", "--max-length", "0"), ("calibrate", "--max-length", "99999999999999999999999"),
    ("calibrate", "--dist-timeout", "0"), ("calibrate", "--dist-timeout", "inf"), ("calibrate", "--dist-timeout", "1e300"),
    ("calibrate", "--dist-timeout", "nan"),
    ("convert", "--timeout", "0"), ("convert", "--timeout", "-1"), ("convert", "--timeout", "nan"),
    ("convert", "--atol", "inf"), ("convert", "--rtol", "inf"), ("convert", "--atol", "nan"),
    ("convert", "--max-length", "16777217"), ("convert", "--batch-size", "0"),
    ("sweep", "--batch-size", "0"), ("sweep", "--threads", "0"),
]


@pytest.mark.parametrize(("command", "option", "value"), BOUNDS)
def test_count_options_out_of_bounds_are_usage_errors(command: str, option: str, value: str, tmp_path: Path) -> None:
    out = tmp_path / ("m.safetensors" if command == "calibrate" else "out")
    line = one_line_error(invoke(command, "digits-mlp", "-o", out, option, value), 2, option)
    assert "internal error" not in line
    assert not out.exists()


def test_the_largest_counts_take_no_memory_of_their_size(tmp_path: Path) -> None:
    """--batch-size and --max-samples are upper limits: the data is never padded or allocated to them."""
    result = invoke("calibrate", "digits-mlp", "-o", tmp_path / "m.safetensors", "--batch-size", "2147483647",
                    "--max-samples", "2147483647")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("option", "value"), [("--timeout", "0"), ("--atol", "inf"), ("--rtol", "inf")])
def test_validate_bounds_are_usage_errors(option: str, value: str, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    assert invoke("export", "digits-mlp", "-o", model).exit_code == 0
    one_line_error(invoke("validate", model, "digits-mlp", option, value), 2, option)


def test_a_max_length_past_any_line_is_refused_by_the_library() -> None:
    from actsparse_deploy.models.loading import ModelOptions

    with pytest.raises(DataError, match="max_length"):
        ModelOptions(max_length=2**40)
    assert ModelOptions(max_length=1_000_000).max_length == 1_000_000


# --- layers a collection skipped: saved with the statistics, the same notes either way -------------


def _notes(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        extra = json.loads(f.metadata()["extra"])
    return [f"{name}: {why}" for name, why in extra.get("skipped", {}).items()]


def _collect(attending: UserFolder, output: str, *args: str) -> None:
    result = invoke("calibrate", attending.user("build_attending"), "--data", "calib.npy", "--layer-type", "Linear",
                    "--sparsity", "0.5", "-o", output, *args)
    assert result.exit_code == 0, result.output


def test_stats_only_then_select_keeps_the_skipped_layers_notes(attending: UserFolder) -> None:
    _collect(attending, "direct.safetensors")
    _collect(attending, "part.stats.safetensors", "--stats-only")
    stats = Statistics.load(attending.file("part.stats.safetensors"))
    assert list(stats.skipped) == ["attn.out_proj"]
    selected = invoke("select", "part.stats.safetensors", "-o", "selected.safetensors", "--json")
    assert selected.exit_code == 0, selected.output
    direct = _notes(attending.file("direct.safetensors"))
    assert len(direct) == 1 and "attn.out_proj" in direct[0] and "never called" in direct[0]
    assert _notes(attending.file("selected.safetensors")) == direct
    assert any("attn.out_proj" in note for note in json.loads(selected.stdout)["notes"])
    shown = " ".join(invoke("inspect", "selected.safetensors").stderr.split())
    assert "attn.out_proj" in shown


def test_merged_statistics_keep_the_skipped_layers(attending: UserFolder) -> None:
    _collect(attending, "a.stats.safetensors", "--stats-only")
    result = invoke("calibrate", attending.user("build_attending"), "--data", "calib2.npy", "--layer-type", "Linear",
                    "--sparsity", "0.5", "--stats-only", "-o", "b.stats.safetensors")
    assert result.exit_code == 0, result.output
    merged = invoke("merge", "a.stats.safetensors", "b.stats.safetensors", "-o", "all.stats.safetensors", "--json")
    assert merged.exit_code == 0, merged.output
    assert any("attn.out_proj" in note for note in json.loads(merged.stdout)["notes"])
    assert list(Statistics.load(attending.file("all.stats.safetensors")).skipped) == ["attn.out_proj"]
    assert invoke("select", "all.stats.safetensors", "-o", "m.safetensors").exit_code == 0
    assert len(_notes(attending.file("m.safetensors"))) == 1


def test_skipped_layers_merge_as_a_union() -> None:
    a = Statistics(layers={}, skipped={"x.a": "never called"})
    b = Statistics(layers={}, skipped={"x.b": "never called", "x.a": "never called"})
    assert a.merge(b).skipped == {"x.a": "never called", "x.b": "never called"}


def _forged(source: Path, target: Path, skipped: Any) -> Path:
    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata())
    meta["skipped"] = skipped if isinstance(skipped, str) else json.dumps(skipped)
    save_file(load_file(str(source)), str(target), metadata=meta)
    return target


@pytest.mark.parametrize(
    ("case", "skipped"),
    [
        ("not a table", ["attn.out_proj"]),
        ("not JSON", "{"),
        ("a name that is no layer's", {"attn..out_proj": "never called"}),
        ("a reason that is not text", {"attn.out_proj": 5}),
        ("a reason with an escape sequence", {"attn.out_proj": "\x1b[2Jnever called"}),
        ("a reason too long", {"attn.out_proj": "x" * 100_000}),
        ("a layer that has a statistic", {"inp": "never called"}),
        ("nested too deeply", "[" * 100_000 + "]" * 100_000),
    ],
)
def test_forged_skipped_layers_are_refused(attending: UserFolder, case: str, skipped: Any) -> None:
    _collect(attending, "part.stats.safetensors", "--stats-only")
    forged = _forged(attending.file("part.stats.safetensors"), attending.file("forged.safetensors"), skipped)
    one_line_error(invoke("select", forged, "-o", "m.safetensors"), 8, "forged.safetensors", "skipped")
    assert not attending.file("m.safetensors").exists()


@pytest.mark.parametrize(
    "skipped",
    [["attn.out_proj"], {"attn..out_proj": "never called"}, {"attn.out_proj": 5}, {"attn.out_proj": "\x1b[2Jnever"},
     {"attn.out_proj": "x" * 100_000}],
)
def test_forged_skipped_layers_in_a_masks_file_are_refused(attending: UserFolder, skipped: Any) -> None:
    _collect(attending, "m.safetensors")
    with safe_open(str(attending.file("m.safetensors")), "pt") as f:
        meta = dict(f.metadata())
    meta["extra"] = json.dumps({**json.loads(meta["extra"]), "skipped": skipped})
    save_file(load_file(str(attending.file("m.safetensors"))), str(attending.file("forged.safetensors")), metadata=meta)
    one_line_error(invoke("inspect", "forged.safetensors"), 8, "forged.safetensors", "skipped")
