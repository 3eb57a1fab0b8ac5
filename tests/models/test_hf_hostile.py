"""Hostile Hugging Face directories, tokenizers and text files: each refused
with one line and the exit code of its kind, or cut down to what the model can
use, before it costs time or memory; tokenizing stops on a signal or the
validation timeout.

Tiny random models built from configs and saved with ``save_pretrained``,
tokenizer files written with the ``tokenizers`` library: nothing is downloaded."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ..helpers import invoke, one_line_error, start_cli, user_module
from .test_hf import LINES, HFFiles

#: a pre-tokenizer regex that takes quadratic time on a long run of "a" (seconds at 20,000 characters)
SLOW_REGEX = "a+$"
#: a regex whose match on "aaa...b" exceeds oniguruma's retry limit: the tokenizers library panics
PANIC_REGEX = "(a|a)*$"


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> HFFiles:
    return HFFiles(tmp_path_factory.mktemp("hf-hostile"))


def _edited(hf: HFFiles, name: str, file: str, edit: Callable[[dict[str, Any]], Any], source: Path | None = None) -> Path:
    """A copy of the Llama directory (or ``source``) with the JSON ``file`` changed by ``edit`` (in place)."""
    directory = hf.root / name
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(source or hf.llama, directory)
    data = json.loads((directory / file).read_text())
    edit(data)
    (directory / file).write_text(json.dumps(data))
    return directory


def _with_pre_tokenizer(hf: HFFiles, name: str, pattern: str) -> Path:
    """The Llama directory whose tokenizer first splits on ``pattern`` (a Split pre-tokenizer)."""
    def edit(tok: dict[str, Any]) -> None:
        split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
        tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, tok["pre_tokenizer"]]}

    return _edited(hf, name, "tokenizer.json", edit)


def _deep(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


# --- long texts: cut to what --max-length can use before the tokenizer sees them ---------------------


class _Recording:
    """A tokenizer that records the length of every text it is given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.lengths.extend(len(t) for t in texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_a_long_line_is_cut_before_the_tokenizer_sees_it(hf: HFFiles) -> None:
    from actsparse_deploy.data.streams import CHARS_PER_TOKEN
    from actsparse_deploy.models.loading import ModelOptions, load_model

    long = hf.text("long-line.txt", "a" * 300_000 + "b\n" + LINES[0] + "\n")
    loaded = load_model(str(hf.llama), options=ModelOptions(max_length=16))
    recording = _Recording(loaded.hf.tokenizer())
    loaded.hf._tokenizer = recording
    batches = loaded.hf.text_batches(long, batch_size=2)
    assert batches[0]["input_ids"].shape == (2, 16)
    assert max(recording.lengths) <= 16 * CHARS_PER_TOKEN


def _word_tokenizer_directory(hf: HFFiles) -> Path:
    """The Llama directory with a word-level tokenizer that drops whitespace (as BERT's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = hf.root / "word-tokenizer"
    if not directory.exists():
        shutil.copytree(hf.llama, directory, ignore=shutil.ignore_patterns("tokenizer*"))
        words = sorted({w for line in LINES for w in line.split()})
        vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", *words])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", ["byte-level", "word-level"])
def test_cut_text_makes_the_tokens_of_the_whole_text(hf: HFFiles, kind: str) -> None:
    """Cutting before tokenizing never changes the tokens --max-length keeps: long
    texts, and texts whose first characters make few tokens (whitespace a word-level
    tokenizer drops), make exactly the tokens the whole text makes."""
    from actsparse_deploy.models.loading import ModelOptions, load_model

    directory = hf.llama if kind == "byte-level" else _word_tokenizer_directory(hf)
    texts = [" ".join(LINES) * 40, " " * 900 + " ".join(LINES) * 3, LINES[1], "\t \t" * 300 + LINES[2], "x" * 50_000]
    path = hf.text(f"cut-{kind}.txt", "\n".join(texts) + "\n")
    for max_length in (4, 16, 64):
        loaded = load_model(str(directory), options=ModelOptions(max_length=max_length))
        tokenizer = loaded.hf.tokenizer()
        whole = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
        batches = loaded.hf.text_batches(path, batch_size=len(texts))
        ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
        assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == whole


def test_the_characters_tokenized_per_text_are_bounded(hf: HFFiles) -> None:
    """A text whose first characters make few tokens (long words, one token each) is
    tokenized again with more of it, never past MAX_CHARS_PER_TOKEN per token: its
    tokens are then those of that many first characters."""
    from actsparse_deploy.data.streams import MAX_CHARS_PER_TOKEN
    from actsparse_deploy.models.loading import ModelOptions, load_model

    text = ("x" * 999 + " ") * 1000
    path = hf.text("long-words.txt", text + "\n" + LINES[0] + "\n")
    loaded = load_model(str(_word_tokenizer_directory(hf)), options=ModelOptions(max_length=16))
    recording = _Recording(loaded.hf.tokenizer())
    loaded.hf._tokenizer = recording
    batch = loaded.hf.text_batches(path, batch_size=2)[0]
    most = 16 * MAX_CHARS_PER_TOKEN
    assert max(recording.lengths) <= most
    first = recording.tokenizer([text[:most]], truncation=True, max_length=16, padding=False)["input_ids"][0]
    assert batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist() == first


def _run(directory: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = start_cli(directory, *args)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"actsparse {' '.join(args)} still ran after {timeout} s\n{err[-2000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.slow
def test_a_slow_pre_tokenizer_on_a_long_line_finishes(hf: HFFiles, tmp_path: Path) -> None:
    """A pre-tokenizer regex quadratic in the text's length, on a 300,000-character
    line: only what --max-length can use is tokenized (the whole line took minutes)."""
    directory = _with_pre_tokenizer(hf, "slow-regex", SLOW_REGEX)
    (tmp_path / "long.txt").write_text("a" * 300_000 + "b\n" + "\n".join(LINES) + "\n")
    done = _run(tmp_path, "calibrate", str(directory), "--text", "long.txt", "--max-length", "16", "--layers", "*.down_proj",
                "--sparsity", "0.5", "-o", "m.safetensors")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "m.safetensors").is_file()


def _wait_until_open(proc: subprocess.Popen[str], path: Path, limit: float = 120) -> None:
    """Until ``proc`` has ``path`` open (it reads the text: the tokenizer runs while the batch's file is open)."""
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        try:
            if any(os.path.realpath(f"/proc/{proc.pid}/fd/{fd}") == str(path.resolve()) for fd in os.listdir(f"/proc/{proc.pid}/fd")):
                time.sleep(1.0)  # into the tokenizer
                return
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"never opened {path}: rc {proc.returncode}\n{err[-3000:]}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="watches /proc for the open text file")
@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_the_tokenizer(hf: HFFiles, tmp_path: Path, name: str, code: int) -> None:
    """A tokenizer that would run for hours (a slow regex over a whole 400,000-character
    line, --max-length beyond it) stops on SIGTERM / SIGINT with its exit code and one line."""
    directory = _with_pre_tokenizer(hf, "slow-regex-signal", SLOW_REGEX)
    text = tmp_path / "long.txt"
    text.write_text("a" * 400_000 + "b\n" + "\n".join(LINES) + "\n")
    proc = start_cli(tmp_path, "calibrate", str(directory), "--text", "long.txt", "--max-length", "1000000", "--batch-size", "1",
                     "--layers", "*.down_proj", "--sparsity", "0.5", "-o", "m.safetensors")
    _wait_until_open(proc, text)
    proc.send_signal(getattr(signal, name))
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{name} did not stop the tokenizer within 60 s")
    one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), code, "no partial output", start="")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.slow
def test_the_validation_timeout_stops_the_tokenizer(hf: HFFiles, tmp_path: Path) -> None:
    """Held-out text whose fifth line takes the tokenizer hours: --timeout fails
    the validation (exit 10, one line) instead of waiting."""
    directory = _with_pre_tokenizer(hf, "slow-regex-timeout", SLOW_REGEX)
    (tmp_path / "held.txt").write_text("\n".join(LINES[:4]) + "\n")
    exported = invoke("export", directory, "--heldout-text", tmp_path / "held.txt", "-o", tmp_path / "m.onnx")
    assert exported.exit_code == 0, exported.output
    (tmp_path / "slow.txt").write_text("\n".join(LINES[:4]) + "\n" + "a" * 400_000 + "b\n")
    done = _run(tmp_path, "validate", "m.onnx", str(directory), "--heldout-text", "slow.txt", "--batch-size", "1",
                "--max-length", "1000000", "--timeout", "5")
    line = one_line_error(done, 10)
    assert "timed out" in line and "--timeout" in line


# --- config.json sizes against the weights, before anything is built ---------------------------------


def _forbid(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
    """``owner.name`` fails the test if anything calls it."""

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{name} was called")

    monkeypatch.setattr(owner, name, never)


@pytest.mark.parametrize("change", [{"num_hidden_layers": 100_000}, {"vocab_size": 10**9}, {"intermediate_size": 10**8}])
def test_config_sizes_the_weights_cannot_fill_are_refused_unbuilt(hf: HFFiles, monkeypatch: pytest.MonkeyPatch, change: dict[str, int]) -> None:
    import transformers

    directory = _edited(hf, "big-" + next(iter(change)), "config.json", lambda c: c.update(change))

    _forbid(monkeypatch, transformers.AutoModelForCausalLM, "from_pretrained")
    result = invoke("inspect", directory)
    line = one_line_error(result, 5)
    assert "config.json" in line and "parameters" in line and "model.safetensors" in line


def test_models_with_tied_weights_pass_the_size_check(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    result = invoke("inspect", tmp_path / "gpt2", "--json")
    assert result.exit_code == 0, result.output
    assert any(row["layer"] == "transformer.h.1.mlp.c_proj" for row in json.loads(result.stdout)["layers"])


# --- panics of the tokenizers library: one line, exit 6 -------------------------------------------


def _panicking(hf: HFFiles, kind: str) -> Path:
    if kind == "split":
        return _with_pre_tokenizer(hf, "panic-split", PANIC_REGEX)
    if kind == "replace":
        return _edited(hf, "panic-replace", "tokenizer.json",
                       lambda t: t.update(normalizer={"type": "Replace", "pattern": {"Regex": PANIC_REGEX}, "content": "x"}))
    charsmap = base64.b64encode(b"\x05\x00\x00\x00garbage").decode()
    return _edited(hf, "panic-precompiled", "tokenizer.json",
                   lambda t: t.update(normalizer={"type": "Precompiled", "precompiled_charsmap": charsmap}))


@pytest.mark.parametrize("kind", ["split", "replace", "precompiled"])
def test_a_tokenizer_that_panics_is_one_line(hf: HFFiles, tmp_path: Path, capfd: pytest.CaptureFixture[str], kind: str) -> None:
    directory = _panicking(hf, kind)
    text = hf.text("aaa.txt", "a" * 500 + "b\n")
    result = invoke("calibrate", directory, "--text", text, "-o", tmp_path / "m.safetensors")
    line = one_line_error(result, 6)
    assert "tokenizer" in line and "aaa.txt" in line and "panicked" in line
    assert "panicked at" not in capfd.readouterr().err  # the library's own report stays off the terminal
    assert not (tmp_path / "m.safetensors").exists()


def test_a_panic_on_a_text_tokenized_again_names_its_line(hf: HFFiles, tmp_path: Path) -> None:
    """The sixth text's first characters make too few tokens; tokenized again with more of
    it, the tokenizer panics: the line names text 6, not the start of the batch."""
    directory = _edited(hf, "panic-word", "tokenizer.json", lambda t: t.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": PANIC_REGEX}, "behavior": "Isolated", "invert": False}, t["pre_tokenizer"]]}),
        source=_word_tokenizer_directory(hf))
    text = hf.text("panic-sixth.txt", "\n".join(LINES[:5]) + "\n" + "a" * 500 + "b\n")
    result = invoke("calibrate", directory, "--text", text, "--max-length", "16", "--batch-size", "8", "-o", tmp_path / "m.safetensors")
    line = one_line_error(result, 6)
    assert "panicked" in line and "(text 6)" in line, line


def test_what_else_the_tokenizer_writes_to_stderr_is_kept(hf: HFFiles, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Only the panic's own report is dropped: other writes to file descriptor 2, before and after it, are replayed."""
    from actsparse_deploy.base.errors import DataError
    from actsparse_deploy.models.loading import load_model

    loaded = load_model(str(_panicking(hf, "split")))
    tokenizer = loaded.hf.tokenizer()

    class Noisy(_Recording):
        def __call__(self, texts: list[str], **kwargs: Any) -> Any:
            os.write(2, b"before the panic\n")
            try:
                return self.tokenizer(texts, **kwargs)
            finally:
                os.write(2, b"after the panic\n")

    loaded.hf._tokenizer = Noisy(tokenizer)
    capfd.readouterr()
    with pytest.raises(DataError, match="panicked"):
        loaded.hf.text_batches(hf.text("aaa.txt", "a" * 500 + "b\n"), batch_size=1)
    err = capfd.readouterr().err
    assert "before the panic\nafter the panic\n" in err and "panicked at" not in err, err


@pytest.mark.slow
def test_a_tokenizer_panic_in_a_real_process_is_one_line(hf: HFFiles, tmp_path: Path) -> None:
    directory = _panicking(hf, "split")
    (tmp_path / "aaa.txt").write_text("a" * 500 + "b\n")
    done = _run(tmp_path, "calibrate", str(directory), "--text", "aaa.txt", "-o", "m.safetensors")
    one_line_error(done, 6, "tokenizer")


# --- config.json fields of the wrong type, JSON nested too deep ------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"architectures": 5}, "architectures"),
        ({"architectures": ["LlamaForCausalLM", 5]}, "architectures"),
        ({"architectures": {"a": 1}}, "architectures"),
        ({"model_type": ["llama"]}, "model_type"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ],
)
def test_config_fields_of_the_wrong_type_are_model_errors(hf: HFFiles, change: dict[str, Any], named: str) -> None:
    directory = _edited(hf, "typed-" + named, "config.json", lambda c: c.update(change))
    for task in ((), ("--task", "causal-lm")):
        result = invoke("inspect", directory, *task)
        line = one_line_error(result, 4)
        assert named in line and "config.json" in line


def test_json_nested_too_deep_is_refused_with_its_class(hf: HFFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = hf.root / "deep-config"
    shutil.copytree(hf.llama, config, dirs_exist_ok=True)
    (config / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "x": ' + _deep() + "}")
    result = invoke("inspect", config)
    one_line_error(result, 4, "config.json", "deep")

    tok = hf.root / "deep-tokenizer-config"
    shutil.copytree(hf.llama, tok, dirs_exist_ok=True)
    (tok / "tokenizer_config.json").write_text('{"x": ' + _deep() + "}")
    result = invoke("calibrate", tok, "--text", hf.calib, "-o", tmp_path / "m.safetensors")
    one_line_error(result, 6, "tokenizer_config.json")

    jsonl = hf.text("deep.jsonl", '{"text": "fine"}\n{"text": ' + _deep() + "}\n")
    result = invoke("calibrate", hf.llama, "--text", jsonl, "-o", tmp_path / "m.safetensors")
    one_line_error(result, 6, "deep.jsonl, line 2")

    index = hf.root / "deep-index"
    shutil.copytree(hf.llama, index, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    (index / "model.safetensors.index.json").write_text('{"weight_map": ' + _deep() + "}")
    result = invoke("inspect", index)
    one_line_error(result, 5, "model.safetensors.index.json")

    with user_module(tmp_path, "def build(**kwargs):\n    raise AssertionError\n", monkeypatch) as name:
        result = invoke("inspect", f"{name}:build", "--factory-args", _deep(60_000))
    one_line_error(result, 4, "--factory-args")
    assert not (tmp_path / "m.safetensors").exists()


# --- sharded weights: an index never leads to a pickle --------------------------------------------


def _sharded(hf: HFFiles, name: str, index: str, shard: str, tmp_path: Path) -> tuple[Path, Path]:
    """The Llama directory with its weights split over an index: half in a safetensors shard, half in ``shard``
    (a pickle that touches a marker when unpickled, unless it is a path outside the directory)."""
    from safetensors.torch import load_file, save_file

    directory = hf.root / name
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(hf.llama, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(hf.llama / "model.safetensors")
    keys = sorted(weights)
    first, second = keys[: len(keys) // 2], keys[len(keys) // 2 :]
    save_file({k: weights[k] for k in first}, directory / "model-00001-of-00002.safetensors")
    marker = tmp_path / f"{name}-ran"

    class Evil:
        def __reduce__(self) -> Any:
            return (Path.touch, (marker,))

    if shard.endswith(".bin"):
        torch.save({**{k: weights[k] for k in second}, "evil": Evil()}, directory / shard)
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in first}, **{k: shard for k in second}}
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory, marker


@pytest.mark.parametrize(
    ("index", "shard"),
    [
        ("model.safetensors.index.json", "model-00002-of-00002.bin"),
        ("model.safetensors.index.json", "../outside.safetensors"),
        ("model.safetensors.index.json", "absent.safetensors"),
        ("pytorch_model.bin.index.json", "model-00002-of-00002.bin"),
    ],
)
def test_an_index_never_leads_to_a_pickle_or_outside(hf: HFFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index: str, shard: str) -> None:
    """The index transformers reads (model.safetensors.index.json) may name only
    .safetensors shards in the directory; a pickle shard is refused unread, as a
    pickle beside the weights is (weights_only or not: no pickle is read from a directory)."""
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, hf.root / "outside.safetensors")
    directory, marker = _sharded(hf, f"sharded-{index.split('.')[0]}-{shard.split('.')[-1]}-{len(shard)}", index, shard, tmp_path)

    _forbid(monkeypatch, torch, "load")
    result = invoke("inspect", directory)
    line = one_line_error(result, 5)
    assert shard in line and ".safetensors" in line
    assert index in line or "pickle" in line
    assert "weights_only" not in line and "trust" not in line
    assert not marker.exists()


@pytest.mark.parametrize("named", ["adapter_model.bin", "../outside.safetensors", "model.safetensors.index.json/../x"])
def test_config_naming_its_weights_file_never_leads_to_a_pickle_or_outside(
    hf: HFFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named: str
) -> None:
    """config.json's ``transformers_weights`` (the file transformers reads instead of model.safetensors)
    may name only a .safetensors file (or index) in the directory."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> Any:
            return (Path.touch, (marker,))

    directory = _edited(hf, f"explicit-{len(named)}", "config.json", lambda c: c.update(transformers_weights=named))
    torch.save({"evil": Evil()}, directory / "adapter_model.bin")

    _forbid(monkeypatch, torch, "load")
    result = invoke("inspect", directory)
    line = one_line_error(result, 5)
    assert "transformers_weights" in line and named in line and "weights_only" not in line
    assert not marker.exists()


def test_an_index_that_is_not_a_weight_map_is_refused(hf: HFFiles) -> None:
    for content in ("[1, 2]", '{"weight_map": 5}', '{"weight_map": {"a": 5}}', "{not json"):
        directory = hf.root / "bad-index"
        if directory.exists():
            shutil.rmtree(directory)
        shutil.copytree(hf.llama, directory, ignore=shutil.ignore_patterns("*.safetensors"))
        (directory / "model.safetensors.index.json").write_text(content)
        result = invoke("inspect", directory)
        one_line_error(result, 5, "model.safetensors.index.json")


# --- flags that do not go together: usage errors ---------------------------------------------------


def test_text_flags_with_the_data_flags_are_usage_errors(hf: HFFiles, tmp_path: Path) -> None:
    import numpy as np

    data = tmp_path / "x.npy"
    np.save(data, np.arange(24, dtype=np.int64).reshape(4, 6))
    result = invoke("calibrate", hf.llama, "--text", hf.calib, "--data", data, "-o", tmp_path / "m.safetensors")
    line = one_line_error(result, 2)
    assert "--text" in line and "--data" in line
    result = invoke("convert", hf.llama, "--text", hf.calib, "--heldout-text", hf.held, "--heldout", data, "-o", tmp_path / "out")
    line = one_line_error(result, 2)
    assert "--heldout-text" in line and "--heldout" in line
    result = invoke("calibrate", "digits-mlp", "--text", hf.calib, "-o", tmp_path / "m.safetensors")
    one_line_error(result, 2, "--text", "Hugging Face")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "out").exists()


FACTORY = '''
import torch


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=32))
'''


def test_text_for_a_factory_model_without_tokenizer_is_a_usage_error(hf: HFFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with user_module(tmp_path, FACTORY, monkeypatch) as name:
        result = invoke("calibrate", f"{name}:llama", "--text", hf.calib, "--layers", "*.down_proj", "--sparsity", 0.5,
                        "-o", tmp_path / "m.safetensors")
    one_line_error(result, 2, "--text", "tokenizer")


# --- tokenizer files, and what a directory without text or task is told ---------------------------


def test_a_tokenizer_class_without_its_files_is_named(hf: HFFiles, tmp_path: Path) -> None:
    directory = _edited(hf, "llama-tokenizer-class", "tokenizer_config.json", lambda c: c.update(tokenizer_class="LlamaTokenizer"))
    (directory / "tokenizer.json").unlink()
    result = invoke("calibrate", directory, "--text", hf.calib, "-o", tmp_path / "m.safetensors")
    line = one_line_error(result, 6)
    assert "LlamaTokenizer" in line and "tokenizer.model" in line and "makes no tokens" not in line


def test_a_directory_without_text_is_pointed_to_the_text_flags(hf: HFFiles, tmp_path: Path) -> None:
    result = invoke("convert", hf.llama, "-o", tmp_path / "out")
    one_line_error(result, 6, "--heldout-text")
    result = invoke("convert", hf.llama, "--heldout-text", hf.held, "-o", tmp_path / "out")
    one_line_error(result, 6, "--text")
    result = invoke("export", hf.llama, "-o", tmp_path / "m.onnx")
    one_line_error(result, 6, "--heldout-text")
    result = invoke("calibrate", hf.llama, "-o", tmp_path / "m.safetensors")
    one_line_error(result, 6, "--text")


def _notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("note:")]


def test_the_inferred_task_is_noted(hf: HFFiles, tmp_path: Path) -> None:
    result = invoke("calibrate", hf.llama, "--text", hf.calib, "-o", tmp_path / "a.safetensors")
    assert result.exit_code == 0, result.output
    (note,) = [n for n in _notes(result.stderr) if "task" in n]
    assert "causal-lm" in note and "LlamaForCausalLM" in note and "--task" in note
    result = invoke("calibrate", hf.llama, "--task", "causal-lm", "--text", hf.calib, "-o", tmp_path / "b.safetensors")
    assert result.exit_code == 0 and not [n for n in _notes(result.stderr) if "task" in n]
    result = invoke("inspect", hf.llama)
    assert result.exit_code == 0 and any("causal-lm inferred" in n for n in _notes(result.stderr))


def test_a_sentence_transformers_directory_is_told_of_sentence_embedding(hf: HFFiles, tmp_path: Path) -> None:
    directory = hf.root / "sentence-transformers"
    if not directory.exists():
        shutil.copytree(hf.bert, directory)
        (directory / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]))
    out = tmp_path / "out"
    result = invoke("convert", directory, "--text", hf.calib, "--heldout-text", hf.held, "--max-length", 8, "--no-latency", "-o", out)
    assert result.exit_code == 0, result.output
    (note,) = [n for n in _notes(result.stderr) if "task" in n]
    assert "feature-extraction" in note and "modules.json" in note and "--task sentence-embedding" in note
    report = json.loads((out / "report.json").read_text())
    assert note.removeprefix("note: ") in report["notes"]
