"""Data that streams (issue 12, item 3): calibration and held-out data are read
batch by batch, never whole. A ``.npy`` is memory-mapped a batch at a time, a
glob or directory of shards is read shard by shard (batches span shards, so the
masks equal those of one file), text is read line by line, ``--max-samples``
reads only what it needs, and every stream can be iterated again."""

from __future__ import annotations

import itertools
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actsparse_deploy.base.errors import DataError
from actsparse_deploy.data.batches import first_samples, total_samples
from actsparse_deploy.data.readers import load_data

from ..helpers import invoke, one_line_error


def _images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` digits-shaped inputs (N, 1, 8, 8), float32, in the digits' range."""
    return np.random.default_rng(seed).uniform(0, 16, size=(n, 1, 8, 8)).astype(np.float32)


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
    one_line_error(result, 6, "NaN or Inf", "x.npy")
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
    for data, needle in cases.values():
        result = invoke("calibrate", "digits-mlp", "--data", data, "-o", tmp_path / "m.safetensors")
        one_line_error(result, 6, needle)
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
    from actsparse_deploy.data.streams import text_lines

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
    from actsparse_deploy.data.batches import split_tuning

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


# --- review: hostile data that streams ----------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_shard_changed_or_removed_between_passes_is_one_data_error(tmp_path: Path):
    """The calibration pass and a later pass (held-out, cost) must read the same data: a shard truncated,
    replaced by other data (same size) or deleted after the stream was opened is a DataError naming it,
    never a raw numpy / mmap / OSError, nor a silent read of other samples."""
    for case in ("truncated", "replaced", "deleted"):
        folder = tmp_path / case
        folder.mkdir()
        np.save(folder / "a.npy", _images(8))
        np.save(folder / "b.npy", _images(8, seed=1))
        stream = load_data(f"{folder}/*.npy", batch_size=4)
        assert len(list(stream)) == 4
        if case == "truncated":
            (folder / "b.npy").write_bytes((folder / "b.npy").read_bytes()[:200])
        elif case == "replaced":  # same size and header, other samples, written beside it and renamed over it
            with open(folder / "new.tmp", "wb") as f:
                np.save(f, _images(8, seed=7))
            os.replace(folder / "new.tmp", folder / "b.npy")
        else:
            (folder / "b.npy").unlink()
        with pytest.raises(DataError, match=r"b\.npy.*(changed|removed)"):
            list(stream)


def test_changed_data_mid_convert_is_exit_6_with_nothing_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A held-out shard replaced while convert runs (after its first pass): one line, exit 6, no output."""
    np.save(tmp_path / "x.npy", _images(24))
    np.save(tmp_path / "held.npy", _images(16, seed=3))
    from actsparse_deploy.onnx import validate as validate_module

    real = validate_module.validate

    def swap_then_validate(*args, **kwargs):
        np.save(tmp_path / "new.npy", _images(16, seed=4))
        os.replace(tmp_path / "new.npy", tmp_path / "held.npy")
        return real(*args, **kwargs)

    monkeypatch.setattr(validate_module, "validate", swap_then_validate)
    result = invoke("convert", "digits-mlp", "--data", tmp_path / "x.npy", "--heldout", tmp_path / "held.npy", "--batch-size", 8,
                    "--no-latency", "-o", tmp_path / "out")
    one_line_error(result, 6, "held.npy", "changed")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_no_file_handle_or_mapping_outlives_a_pass(tmp_path: Path):
    """Many passes (whole, cut short, random access) over every format leave no descriptor open."""
    images = _images(20)
    np.save(tmp_path / "a.npy", images)
    np.savez(tmp_path / "b.npz", x=images)
    np.savez_compressed(tmp_path / "c.npz", x=images)
    from safetensors.torch import save_file

    save_file({"x": torch.from_numpy(images)}, str(tmp_path / "d.safetensors"))
    torch.save(torch.from_numpy(images), tmp_path / "e.pt")
    streams = [load_data(tmp_path / name, batch_size=3) for name in ("a.npy", "b.npz", "c.npz", "d.safetensors", "e.pt")]
    before = _open_fds()
    for _ in range(30):
        for stream in streams:
            assert sum(b.shape[0] for b in stream) == 20
            next(iter(stream))  # a pass cut short
            assert stream[2].shape[0] == 3
    assert _open_fds() == before


def test_many_shards_and_max_samples_past_the_end(tmp_path: Path):
    images = _images(300)
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(300):
        np.save(folder / f"part-{i:04d}.npy", images[i:i + 1])
    before = _open_fds()
    stream = load_data(folder, batch_size=32)
    assert total_samples(stream) == 300 and len(stream) == 10 and _open_fds() == before
    assert torch.equal(torch.cat(list(stream)), torch.from_numpy(images))
    head = first_samples(stream, 10_000)  # more than there is: all of it
    assert total_samples(head) == 300 and sum(b.shape[0] for b in head) == 300
    result = invoke("calibrate", "digits-mlp", "--data", folder, "--max-samples", 10_000, "-o", tmp_path / "m.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert '"samples": 300' in result.stdout


def test_globs_that_match_directories_or_other_files(tmp_path: Path):
    np.save(tmp_path / "a.npy", _images(4))
    (tmp_path / "b.npy.d").mkdir()  # a directory the glob matches: not a shard
    stream = load_data(f"{tmp_path}/*.npy*", batch_size=4)
    assert total_samples(stream) == 4
    (tmp_path / "notes.txt").write_text("not data")
    result = invoke("calibrate", "digits-mlp", "--data", f"{tmp_path}/*", "-o", tmp_path / "m.safetensors")
    one_line_error(result, 6, "notes.txt")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "sub.npy").mkdir()
    result = invoke("calibrate", "digits-mlp", "--data", f"{tmp_path}/only/*.npy", "-o", tmp_path / "m.safetensors")
    one_line_error(result, 6, "matches no files")


def test_zero_row_shard_is_named(tmp_path: Path):
    np.save(tmp_path / "a.npy", _images(4))
    np.save(tmp_path / "b.npy", np.zeros((0, 1, 8, 8), dtype=np.float32))
    result = invoke("calibrate", "digits-mlp", "--data", f"{tmp_path}/*.npy", "-o", tmp_path / "m.safetensors")
    one_line_error(result, 6, "b.npy", "0 samples")


def test_fortran_order_and_big_endian_npy_read_as_the_same_numbers(tmp_path: Path):
    images = _images(10)
    np.save(tmp_path / "c.npy", images)
    np.save(tmp_path / "f.npy", np.asfortranarray(images))
    np.save(tmp_path / "be.npy", images.astype(">f4"))
    np.savez(tmp_path / "be.npz", x=images.astype(">f4"))
    np.save(tmp_path / "be16.npy", images.astype(">f2"))
    np.save(tmp_path / "be64.npy", (images * 10).astype(">i8"))
    for name in ("f.npy", "be.npy", "be.npz"):
        got = torch.cat(list(load_data(tmp_path / name, batch_size=3)))
        assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(images)), name
    half = torch.cat(list(load_data(tmp_path / "be16.npy", batch_size=3)))
    assert half.dtype == torch.float16 and torch.equal(half, torch.from_numpy(images.astype(np.float16)))
    ints = torch.cat(list(load_data(tmp_path / "be64.npy", batch_size=3)))
    assert ints.dtype == torch.int64 and torch.equal(ints, torch.from_numpy((images * 10).astype(np.int64)))
    outputs = {}
    for name in ("c.npy", "be.npy", "f.npy"):
        outputs[name] = tmp_path / f"{name}.safetensors"
        result = invoke("calibrate", "digits-mlp", "--data", tmp_path / name, "-o", outputs[name])
        assert result.exit_code == 0, (name, result.output)
    for name in ("be.npy", "f.npy"):
        one, other = _masks(outputs["c.npy"]), _masks(outputs[name])
        assert all(torch.equal(one[k], other[k]) for k in one), name


def test_dict_shards_are_matched_by_name(tmp_path: Path):
    """npz shards holding the same members in another order are the same data; other members are refused."""
    ids = np.arange(8 * 3).reshape(8, 3)
    np.savez(tmp_path / "a.npz", input_ids=ids[:4], attention_mask=np.ones((4, 3), dtype=np.int64))
    np.savez(tmp_path / "b.npz", attention_mask=np.ones((4, 3), dtype=np.int64), input_ids=ids[4:])
    batches = list(load_data(f"{tmp_path}/*.npz", batch_size=8))
    assert len(batches) == 1 and torch.equal(batches[0]["input_ids"], torch.from_numpy(ids))
    assert torch.equal(batches[0]["attention_mask"], torch.ones(8, 3, dtype=torch.int64))
    np.savez(tmp_path / "c.npz", input_ids=ids[:4], token_type_ids=np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(DataError, match=r"c\.npz.*same arrays"):
        load_data(f"{tmp_path}/*.npz", batch_size=8)


def test_heldout_glob_or_directory_that_is_the_calibration_data_is_refused(tmp_path: Path):
    from actsparse_deploy.data.readers import check_distinct_data

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        np.save(shards / f"part-{i}.npy", _images(4, seed=i))
    copy = tmp_path / "copy"
    copy.mkdir()
    np.save(copy / "other.npy", _images(4, seed=2))  # a byte-identical copy of one shard
    held = tmp_path / "held"
    held.mkdir()
    np.save(held / "part-0.npy", _images(4, seed=10))
    for data, heldout in ((f"{shards}/*.npy", f"{shards}/*.npy"), (shards, f"{shards}/part-1.npy"), (str(shards), copy),
                          (f"{shards}/part-2.npy", copy)):
        with pytest.raises(DataError, match="is the calibration data|calibration data"):
            check_distinct_data(data, heldout)
    check_distinct_data(f"{shards}/*.npy", held)  # other samples: fine
    check_distinct_data(shards, f"{held}/*.npy")
    result = invoke("convert", "digits-mlp", "--data", f"{shards}/*.npy", "--heldout", shards, "--no-latency", "-o", tmp_path / "out")
    one_line_error(result, 6, "calibration data")


def test_text_files_crlf_bom_blank_invalid_long_and_empty(tmp_path: Path):
    from actsparse_deploy.data.streams import MAX_LINE_BYTES, text_lines

    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"\xef\xbb\xbfone\r\n\r\n  \r\ntwo\r\nthree")
    assert list(text_lines(crlf)) == ["one", "two", "three"]  # no BOM, no \r, blank lines gone
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert list(text_lines(jsonl)) == ["a", "b"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"".join(b"fine line %d\n" % i for i in range(5000)) + b"broken \xff\xfe here\n" + b"after\n")
    with pytest.raises(DataError, match=r"bad\.txt.*line 5001.*UTF-8"):
        list(text_lines(bad))
    assert len(list(itertools.islice(text_lines(bad), 4000))) == 4000  # what comes before it reads
    long = tmp_path / "long.txt"
    with open(long, "wb") as f:
        f.write(b"short\n")
        f.write(b"x" * (MAX_LINE_BYTES + 10))
        f.write(b"\nend\n")
    lines = text_lines(long)
    assert next(lines) == "short"
    with pytest.raises(DataError, match=r"long\.txt.*line 2.*longer than"):
        next(lines)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert list(text_lines(empty)) == []
    with pytest.raises(DataError, match="not a file|does not exist"):
        list(text_lines(tmp_path))


@pytest.mark.parametrize(("samples", "size"), [(37, 6), (11, 4), (5, 5), (2, 1), (23, 32)])
def test_tuning_split_of_a_stream_is_that_of_the_list(tmp_path: Path, samples: int, size: int):
    """Every fifth sample tunes, whether the data streams or sits in a list: the same samples, in the same batches."""
    from actsparse_deploy.data.batches import split_tuning

    np.save(tmp_path / "x.npy", _images(samples, seed=samples))
    stream = load_data(tmp_path / "x.npy", batch_size=size)
    streamed, listed = split_tuning(stream), split_tuning(list(stream))
    for a, b in zip(streamed, listed):
        got, want = list(a), list(b)
        assert [t.shape[0] for t in got] == [t.shape[0] for t in want]
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    tuned = torch.cat(list(streamed[1]))
    count = max(1, round(0.2 * samples))  # spread evenly: sample i tunes where (i + 1) * count // samples steps up
    every_fifth = [i for i in range(samples) if (i + 1) * count // samples > i * count // samples]
    assert torch.equal(tuned, torch.from_numpy(_images(samples, seed=samples)[every_fifth]))
    assert streamed[0].samples + streamed[1].samples == samples and streamed[1].samples == len(every_fifth)


def test_a_stream_is_a_source_that_says_how_to_read_itself():
    """Stream is the abstract base of the sources: one without ``__iter__`` cannot be made."""
    from actsparse_deploy.data.batches import Generated, Stream

    class Incomplete(Stream):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()  # type: ignore[abstract]
    assert [b.shape[0] for b in Generated(lambda: iter([torch.zeros(2, 3), torch.zeros(1, 3)]), 3)] == [2, 1]
