"""Data that streams (issue 12, item 3): calibration and held-out data are read
batch by batch, never whole. A ``.npy`` is memory-mapped a batch at a time, a
glob or directory of shards is read shard by shard (batches span shards, so the
masks equal those of one file), text is read line by line, ``--max-samples``
reads only what it needs, and every stream can be iterated again."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actsparse_deploy.batches import first_samples, total_samples
from actsparse_deploy.errors import DataError
from actsparse_deploy.loading import load_data

from .helpers import invoke


def _images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` digits-shaped inputs (N, 1, 8, 8), float32, in the digits' range."""
    return np.random.default_rng(seed).uniform(0, 16, size=(n, 1, 8, 8)).astype(np.float32)


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def _masks(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_max_samples_reads_only_the_rows_it_needs(tmp_path: Path):
    """Rows past the first 16 hold NaN: calibrating on 16 samples never reads them
    (a file read whole would be refused); all of it is refused, naming the file."""
    images = _images(64)
    images[16:] = np.nan
    np.save(tmp_path / "x.npy", images)
    result = invoke("calibrate", "digits-mlp", "--data", tmp_path / "x.npy", "--batch-size", 8, "--max-samples", 16,
                    "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.output
    result = invoke("calibrate", "digits-mlp", "--data", tmp_path / "x.npy", "--batch-size", 8, "-o", tmp_path / "all.safetensors")
    assert result.exit_code == 6
    assert "NaN or Inf" in _one_line(result) and "x.npy" in _one_line(result)
    assert not (tmp_path / "all.safetensors").exists()


def test_npy_is_memory_mapped_batch_by_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each batch maps only its own rows (np.memmap); nothing reads the array whole."""
    np.save(tmp_path / "x.npy", _images(40))
    mapped: list[int] = []
    real = np.memmap.__new__

    def spy(cls, *args, **kwargs):
        array = real(cls, *args, **kwargs)
        mapped.append(int(array.shape[0]))
        return array

    monkeypatch.setattr(np.memmap, "__new__", spy)
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: pytest.fail("read whole"))
    stream = load_data(tmp_path / "x.npy", batch_size=16)
    assert total_samples(stream) == 40 and len(stream) == 3
    assert [b.shape[0] for b in stream] == [16, 16, 8]
    assert max(mapped) <= 16


def test_shards_glob_and_directory_give_the_masks_of_one_file(tmp_path: Path):
    images = _images(50)
    np.save(tmp_path / "all.npy", images)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, (start, stop) in enumerate(((0, 17), (17, 20), (20, 50))):  # batches of 8 span the shards
        np.save(shards / f"part-{i:02d}.npy", images[start:stop])
    (shards / "README.txt").write_text("not data: a directory's other files are skipped")
    outputs = {}
    for name, data in (("one", tmp_path / "all.npy"), ("glob", f"{shards}/part-*.npy"), ("dir", shards)):
        outputs[name] = tmp_path / f"{name}.safetensors"
        result = invoke("calibrate", "digits-mlp", "--data", data, "--batch-size", 8, "-o", outputs[name])
        assert result.exit_code == 0, result.output
    one = _masks(outputs["one"])
    for name in ("glob", "dir"):
        other = _masks(outputs[name])
        assert one.keys() == other.keys()
        for key in one:
            assert torch.equal(one[key], other[key]), (name, key)
    stream = load_data(f"{shards}/part-*.npy", batch_size=8)
    assert [b.shape[0] for b in stream] == [8] * 6 + [2] and total_samples(stream) == 50
    assert torch.equal(torch.cat(list(stream)), torch.from_numpy(images))


def test_bad_shards_are_one_line_exit_6(tmp_path: Path):
    good = tmp_path / "good"
    good.mkdir()
    np.save(good / "a.npy", _images(4))
    cases: dict[str, tuple[str, str]] = {}

    wide = tmp_path / "wide"
    wide.mkdir()
    np.save(wide / "a.npy", _images(4))
    np.save(wide / "b.npy", np.zeros((4, 1, 8, 9), dtype=np.float32))
    cases["shape"] = (f"{wide}/*.npy", "b.npy")
    typed = tmp_path / "typed"
    typed.mkdir()
    np.save(typed / "a.npy", _images(4))
    np.save(typed / "b.npy", np.zeros((4, 1, 8, 8), dtype=np.int64))
    cases["dtype"] = (str(typed), "b.npy")
    cases["empty glob"] = (f"{tmp_path}/nothing-*.npy", "matches no")
    (tmp_path / "empty").mkdir()
    cases["empty dir"] = (str(tmp_path / "empty"), "no data files")
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    np.save(hostile / "a.npy", _images(4))
    np.save(hostile / "b.npy", np.array([{"x": 1}] * 4, dtype=object), allow_pickle=True)
    cases["object array"] = (f"{hostile}/*.npy", "b.npy")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    np.save(pickled / "a.npy", _images(4))
    (pickled / "b.pt").write_bytes(pickle.dumps({"x": torch.zeros(4, 1, 8, 8)}, protocol=2).replace(b"torch", b"posix"))
    cases["pickle"] = (str(pickled), "b.pt")
    lying = tmp_path / "lying"
    lying.mkdir()
    np.save(lying / "a.npy", _images(4))
    raw = bytearray((lying / "a.npy").read_bytes())
    np.save(lying / "b.npy", _images(4))
    header = (lying / "b.npy").read_bytes()
    (lying / "b.npy").write_bytes(header.replace(b"(4, 1, 8, 8)", b"(9999, 1, 8, 8)"))
    cases["lying header"] = (f"{lying}/*.npy", "b.npy")
    del raw
    for name, (data, needle) in cases.items():
        result = invoke("calibrate", "digits-mlp", "--data", data, "-o", tmp_path / "m.safetensors")
        assert result.exit_code == 6, (name, result.output)
        assert needle in _one_line(result), (name, result.output)
        assert not (tmp_path / "m.safetensors").exists()


def test_streams_iterate_again_and_cut_lazily(tmp_path: Path):
    images = _images(30)
    np.save(tmp_path / "x.npy", images)
    np.savez(tmp_path / "two.npz", input_ids=np.arange(30 * 3).reshape(30, 3), attention_mask=np.ones((30, 3), dtype=np.int64))
    for path in (tmp_path / "x.npy", tmp_path / "two.npz"):
        stream = load_data(path, batch_size=7)
        first, second = list(stream), list(stream)
        assert len(first) == 5 and total_samples(stream) == 30
        for a, b in zip(first, second):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else all(torch.equal(a[k], b[k]) for k in a)
        head = first_samples(stream, 10)
        assert total_samples(head) == 10 and [len(list(head)), len(list(head))] == [2, 2]
    stream = load_data(tmp_path / "x.npy", batch_size=7)
    assert torch.equal(stream[1], torch.from_numpy(images[7:14])) and torch.equal(stream[-1], torch.from_numpy(images[28:]))


def test_text_is_read_line_by_line(tmp_path: Path):
    """Only the lines a batch needs are read: a .jsonl whose line 5 is broken is
    fine for the first 4 texts and refused (naming the line) past them."""
    from actsparse_deploy.streams import text_lines

    path = tmp_path / "t.jsonl"
    path.write_text("".join(f'{{"text": "sentence {i}"}}\n' for i in range(4)) + "{broken\n" + '{"text": "x"}\n' * 10_000)
    lines = text_lines(path)
    assert [text for _, text in zip(range(4), lines)] == [f"sentence {i}" for i in range(4)]
    with pytest.raises(DataError, match=r"t\.jsonl, line 5: not JSON"):
        list(text_lines(path))
    blank = tmp_path / "blank.txt"
    blank.write_text("one\n\n  \ntwo\n")
    assert list(text_lines(blank)) == ["one", "two"]


def test_budget_and_convert_on_a_stream(tmp_path: Path):
    """The budget's tuning split streams (every fifth sample), convert uses held-out
    data several times (example, validation, cost) from a stream."""
    from actsparse_deploy.budget import split_tuning

    np.save(tmp_path / "x.npy", _images(40, seed=1))
    stream = load_data(tmp_path / "x.npy", batch_size=8)
    calibration, tuning = split_tuning(stream)
    assert (calibration.samples, tuning.samples) == (32, 8)  # streams again: known from the header, nothing read
    listed = split_tuning(list(stream))
    for streamed, lists in zip((calibration, tuning), listed):
        assert torch.equal(torch.cat(list(streamed)), torch.cat(lists))
        assert torch.equal(torch.cat(list(streamed)), torch.cat(list(streamed)))  # again
    np.save(tmp_path / "held.npy", _images(24, seed=2))
    result = invoke("convert", "digits-mlp", "--data", tmp_path / "x.npy", "--heldout", tmp_path / "held.npy", "--batch-size", 8,
                    "--max-cost", "cosine=0.9", "--atol", "1e-3", "--no-latency", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert '"heldout_samples": 24' in result.stdout
