"""Data-parallel calibration on torch.distributed (gloo on 127.0.0.1): masks of
2 and 3 processes equal one process's (Python API, the CLI, torchrun), a rank
that fails or dies stops every rank with one line, unmergeable statistics and
--device cuda without CUDA are refused before any work.

Workers are launched with the variables torchrun sets (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); one test goes through torchrun itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from actsparse_deploy import Recipe, collect, select
from actsparse_deploy.base.errors import CalibrationError, UsageError
from actsparse_deploy.calibration.distributed import check_reducible, resolve_device
from actsparse_deploy.calibration.masks import Masks

from ..helpers import invoke, one_line_error

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra.get("PYTHONPATH"), str(ROOT)) if p)
    return env


def _launch(argv: list[str], world: int, cwd: Path, timeout: float = 60, **extra: str) -> list[subprocess.CompletedProcess[str]]:
    """``argv`` in ``world`` processes at once, as torchrun would start them."""
    port = _free_port()
    procs = [subprocess.Popen(argv, cwd=cwd, env=_env(r, world, port, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(world)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "actsparse_deploy", *map(str, args)]


# --- the Python API: 2 processes, several statistics, errors exchanged ---------------

WORKER = textwrap.dedent('''
    import json, sys, datetime
    import torch, torch.distributed as dist
    from torch import nn
    from actsparse_deploy import Recipe, collect, select
    from actsparse_deploy.calibration.calibrate import calibrate

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank = dist.get_rank()
    out = {}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 2))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 8, generator=g) for n in (4, 3, 5, 2, 6)]
    recipe = Recipe.coerce({
        "defaults": {"sparse_config": {"sparsity_level": 0.5}},
        "layers": [{"name": "2", "aggregate_fn": "max_abs"}, {"name": "4", "aggregate_fn": "gram", "method": "obs", "compensate": "lstsq"},
                   {"name": "0", "aggregate_fn": "sum_abs", "features": [1, 3, 5], "feature_dim": -1}],
    })
    mine = collect(model, recipe, batches)                 # the default group, sharded by rank
    alone = collect(model, recipe, batches, group=False)   # this process over every batch
    out["samples"] = [mine.num_samples, alone.num_samples, mine.num_batches, alone.num_batches]
    out["exact"] = all(torch.equal(a.value, b.value) and a.count == b.count
                       for n in mine for a, b in zip(mine[n].parts, alone[n].parts))
    out["close"] = all(torch.allclose(a.value, b.value, rtol=1e-12, atol=0) for n in mine for a, b in zip(mine[n].parts, alone[n].parts))
    out["dtypes"] = sorted({f"{p.value.dtype} {p.value.device}" for n in mine for p in mine[n].parts})
    out["layer_counts"] = [[mine[n].num_samples, mine[n].num_batches] for n in mine] == [[alone[n].num_samples, alone[n].num_batches] for n in alone]
    a, b = select(mine, model=model), select(alone, model=model)
    parts = lambda m, n: m.layers[n].mask if isinstance(m.layers[n].mask, tuple) else (m.layers[n].mask,)
    out["masks_equal"] = all(len(parts(a, n)) == len(parts(b, n)) and all(torch.equal(x, y) for x, y in zip(parts(a, n), parts(b, n)))
                             for n in b.layers) and list(a.layers) == list(b.layers)
    out["feature_parts"] = len(parts(a, "0"))
    out["weights_equal"] = torch.equal(a.layers["4"].weight, b.layers["4"].weight)
    out["calibrate_equal"] = torch.equal(calibrate(model, recipe, batches).layers["2"].mask, b.layers["2"].mask)

    def same(stats, reference):
        return stats.num_samples == reference.num_samples and all(
            torch.equal(x.value, y.value) and x.count == y.count for n in reference for x, y in zip(stats[n].parts, reference[n].parts))

    # a generator of every batch (sharded as it is read), each rank's own share (shard=False), a stream of a .npy file
    out["generator_equal"] = same(collect(model, recipe, (t for t in batches)), alone)
    out["own_share_equal"] = same(collect(model, recipe, batches[rank::2], shard=False), alone)
    import numpy as np
    from actsparse_deploy.data.streams import array_stream
    if rank == 0:
        np.save(sys.argv[1] + "/calib.npy", torch.cat(batches).numpy())
    dist.barrier()
    stream = array_stream(sys.argv[1] + "/calib.npy", batch_size=4)
    out["stream_equal"] = same(collect(model, recipe, stream), collect(model, recipe, list(stream), group=False))

    def error(fn):
        try:
            fn()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None

    # batch 1 (rank 1's) is 7 wide: the model fails there; every rank names rank 1
    bad = [torch.randn(2, 8), torch.randn(2, 7), torch.randn(2, 8)]
    out["data_error"] = error(lambda: collect(model, recipe, bad))
    # each rank's own share (shard=False) with another per-sample shape: a conv's statistic differs
    conv = nn.Sequential(nn.Conv2d(1, 2, 3))
    side = 6 if rank == 0 else 5
    out["shape_error"] = error(lambda: collect(conv, Recipe.simple(layers=["0"], sparsity=0.5), [torch.randn(2, 1, side, side)], shard=False))
    # still in step after all that: one more reduction works
    out["after"] = collect(model, recipe, batches).num_samples
    json.dump(out, open(sys.argv[1] + f"/rank{rank}.json", "w"))
    dist.destroy_process_group()
''')


@pytest.mark.slow  # real processes, each importing torch
def test_python_api_two_ranks_equal_one_process_and_errors_name_the_rank(tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text(WORKER)
    done = _launch([sys.executable, "worker.py", str(tmp_path)], 2, tmp_path)
    assert [p.returncode for p in done] == [0, 0], [p.stderr[-2000:] for p in done]
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["samples"] == [20, 20, 5, 5]
        assert out["exact"] and out["close"] and out["layer_counts"]  # float32 partials add exactly in float64
        assert out["dtypes"] == ["torch.float64 cpu"]
        assert out["masks_equal"] and out["weights_equal"] and out["calibrate_equal"] and out["feature_parts"] == 3
        assert out["data_error"].startswith("DataError: rank 1: the model failed on calibration batch 1 (float32[2, 7])")
        assert out["shape_error"].startswith("CalibrationError: layer '0': rank 1 collected a statistic with stat shapes [[1, 5, 5]] and rank 0 one with [[1, 6, 6]]")
        assert out["after"] == 20
        assert out["generator_equal"] and out["own_share_equal"] and out["stream_equal"]


# --- the CLI: a user model, a failing and a dying rank ------------------------------

MODEL = textwrap.dedent('''
    import os, signal, torch
    from torch import nn

    def _on_this_rank(name):  # only when set: in one process neither variable is
        return os.environ.get(name) is not None and os.environ.get(name) == os.environ.get("RANK")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1 if _on_this_rank("SEED_ON_RANK") else 0)
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            if _on_this_rank("DIE_ON_RANK"):
                os.kill(os.getpid(), signal.SIGKILL)
            if _on_this_rank("FAIL_ON_RANK"):
                raise RuntimeError("cuBLAS exploded")
            return self.fc2(torch.relu(self.fc1(x)))

    def build():
        return Net()
''')


@pytest.fixture
def user_model(tmp_path: Path) -> Path:
    (tmp_path / "distnet.py").write_text(MODEL)
    data = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
    np.save(tmp_path / "calib.npy", data)
    return tmp_path


def _calibrate_args(out: str = "masks.safetensors", *extra: object) -> list[str]:
    return _cli("calibrate", "distnet:build", "--data", "calib.npy", "-b", "4", "--layers", "fc2", "--sparsity", "0.5", "-o", out,
                "--dist-timeout", "5", *extra)


@pytest.mark.slow  # real processes, each importing torch
def test_cli_failing_rank_stops_every_rank_with_one_line_naming_it(user_model: Path) -> None:
    done = _launch(_calibrate_args(), 2, user_model, PYTHONPATH=str(user_model), FAIL_ON_RANK="1")
    for p in done:
        one_line_error(p, 6, start="error: rank 1: the model failed on calibration batch 1 (float32[4, 8]): RuntimeError: cuBLAS exploded")
        assert p.stdout == ""
    assert sorted(q.name for q in user_model.iterdir() if not q.name.startswith("__")) == ["calib.npy", "distnet.py"]


@pytest.mark.slow  # real processes, each importing torch
def test_cli_rank_killed_stops_the_others_without_hanging(user_model: Path) -> None:
    done = _launch(_calibrate_args(), 2, user_model, timeout=30, PYTHONPATH=str(user_model), DIE_ON_RANK="1")
    assert done[1].returncode == -9
    p = done[0]
    line = one_line_error(p, 7, start="error: rank 0: distributed calibration stopped: ")
    assert "a rank died" in line or "within 5 s (--dist-timeout)" in line, line
    assert not (user_model / "masks.safetensors").exists()


@pytest.mark.slow  # real processes, each importing torch
def test_cli_three_ranks_through_torchrun_equal_one_process(tmp_path: Path) -> None:
    """The documented command, 3 ranks over 2 batches (rank 2 gets none): the
    masks of one process, rank 0 alone prints and writes."""
    args = ["calibrate", "digits-cnn", "--max-samples", "64", "-b", "32", "-o"]
    one = invoke(*args, tmp_path / "one.safetensors")
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m", "actsparse_deploy",
                        *args, "three.safetensors", "--dist-timeout", "60"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("masks written to three.safetensors") == 1
    assert "64 calibration samples" in p.stdout
    a, b = Masks.load(tmp_path / "one.safetensors"), Masks.load(tmp_path / "three.safetensors")
    assert (a.num_samples, a.num_batches) == (b.num_samples, b.num_batches) == (64, 2)
    for name in a.layers:
        assert torch.equal(a.layers[name].mask, b.layers[name].mask), name
        for field in ("weight", "bias"):
            x, y = getattr(a.layers[name], field), getattr(b.layers[name], field)
            assert (x is None and y is None) or torch.equal(x, y), (name, field)


# --- in this process ------------------------------------------------------------------


def test_device_cuda_without_cuda_is_refused_before_work(tmp_path: Path) -> None:
    assert not torch.cuda.is_available()  # this suite runs on CPU; there the refusal is what is tested
    for command in (["calibrate", "digits-mlp", "-o", tmp_path / "m.safetensors"], ["convert", "digits-mlp", "-o", tmp_path / "out"]):
        one_line_error(invoke(*command, "--device", "cuda"), 2, start="error: --device cuda: no CUDA device is available")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="not one of cpu, cuda"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")


def test_statistics_accumulate_in_float64_on_the_model_device_and_cpu_calibrate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    batches = [torch.randn(3, 4, dtype=torch.float64).float() for _ in range(2)]
    stats = collect(model, Recipe.simple(layers=["2"], sparsity=0.5), batches)
    part = stats["2"].parts[0]
    assert (part.value.dtype, part.value.device.type, part.count) == (torch.float64, "cpu", 6)
    assert select(stats)["2"].sparsity == 0.5
    result = invoke("calibrate", "digits-mlp", "--max-samples", "32", "--device", "cpu", "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.output
    assert Masks.load(tmp_path / "m.safetensors").num_samples == 32


def test_unreducible_statistics_refused() -> None:
    """A recipe names built-in aggregates only; a user aggregate's statistic
    (from an ActivationSparsifier: combine None) or a layer config holding a
    callable is refused, as collect does before it reads a batch."""
    from actsparse_deploy import ActivationSparsifier

    class Row:
        aggregate_fn = staticmethod(lambda agg, x: x)

    with pytest.raises(CalibrationError, match="layer 'fc': a user aggregate function's statistic cannot be reduced across ranks"):
        check_reducible({"fc": Row()})
    model = nn.Sequential(nn.Linear(4, 3))
    sparsifier = ActivationSparsifier(model, aggregate_fn=lambda agg, x: x if agg is None else agg + x, reduce_fn="mean",
                                      mask_fn="topk", sparsity_level=0.5)
    sparsifier.register_layer(model[0])
    model(torch.randn(2, 4))
    with pytest.raises(CalibrationError, match="layer '0': a user aggregate"):
        check_reducible(sparsifier.statistics())


# --- review: usage errors, the torchrun environment of one process, sharding ----------


@pytest.mark.parametrize("value", ["nan", "inf", "1e300"])
def test_dist_timeout_not_a_finite_positive_number_is_a_usage_error(tmp_path: Path, value: str) -> None:
    """typer's min= lets inf and 1e300 through (the timedelta overflows); checked in one process too, not only under torchrun."""
    result = invoke("calibrate", "digits-mlp", "--max-samples", "8", "-o", tmp_path / "m.safetensors", "--dist-timeout", value)
    one_line_error(result, 2, "--dist-timeout")  # typer's own refusal (nan) or the check's
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-1", "-inf"])
def test_dist_timeout_zero_or_negative_is_a_usage_error(tmp_path: Path, value: str) -> None:
    result = invoke("convert", "digits-mlp", "-o", tmp_path / "out", "--dist-timeout", value)
    one_line_error(result, 2, "--dist-timeout")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["cuda:\u00b2", "cuda:\u0661", "cuda:", "cuda:-1", "CPU", " cpu", "cuda:0x"])
def test_malformed_device_is_a_usage_error(tmp_path: Path, device: str) -> None:
    """A non-ASCII digit (\u00b2 passes str.isdigit, int() refuses it) is exit 2, not an internal error."""
    result = invoke("calibrate", "digits-mlp", "-o", tmp_path / "m.safetensors", "--device", device)
    one_line_error(result, 2, start="error: --device ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("env", "start"), [
    ({"WORLD_SIZE": "\u00b2"}, "error: WORLD_SIZE="),
    ({"WORLD_SIZE": "2"}, "error: WORLD_SIZE is 2 but RANK, MASTER_ADDR, MASTER_PORT is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "error: RANK='2' is not a rank of WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "x", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "error: RANK='x' is not a rank of WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"}, "error: MASTER_PORT='x' is not a port"),
])
def test_malformed_launcher_environment_is_a_usage_error_before_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      env: dict[str, str], start: str) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = invoke("calibrate", "digits-mlp", "-o", tmp_path / "m.safetensors", "--dist-timeout", "2")
    one_line_error(result, 2, start=start)
    assert list(tmp_path.iterdir()) == []


def test_torchrun_environment_of_one_process_is_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nproc-per-node 1 sets every variable with WORLD_SIZE=1: no process group, the same file as without."""
    import torch.distributed as dist

    args = ("calibrate", "digits-mlp", "--max-samples", "64", "-b", "16", "--stats-only", "-o")
    plain = invoke(*args, tmp_path / "plain.safetensors")
    assert plain.exit_code == 0, plain.output
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    launched_run = invoke(*args, tmp_path / "one.safetensors")
    assert launched_run.exit_code == 0, launched_run.output
    assert not dist.is_initialized()
    assert launched_run.output.replace("one.safetensors", "X") == plain.output.replace("plain.safetensors", "X")
    from actsparse_deploy.calibration.stats import Statistics

    a, b = Statistics.load(tmp_path / "plain.safetensors"), Statistics.load(tmp_path / "one.safetensors")
    assert (a.num_samples, a.fingerprint) == (b.num_samples, b.fingerprint) == (64, a.fingerprint)
    assert all(torch.equal(x.value, y.value) for n in a.layers for x, y in zip(a[n].parts, b[n].parts))


def test_shard_takes_a_generator_lazily_and_reads_only_its_batches_of_an_array_stream(tmp_path: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy.calibration.distributed import Session
    from actsparse_deploy.data.streams import array_stream

    made: list[int] = []

    def endless() -> Any:
        i = 0
        while True:
            made.append(i)
            yield torch.full((1, 2), float(i))
            i += 1

    share = Session(group=None, rank=1, world=3).shard(endless())
    first = [float(next(share)[0, 0]) for _ in range(3)]
    assert first == [1.0, 4.0, 7.0] and len(made) == 8  # never materialised (the generator has no end)

    np.save(tmp_path / "x.npy", np.arange(30, dtype=np.float32).reshape(10, 3))
    stream = array_stream(tmp_path / "x.npy", batch_size=2)  # 5 batches
    read: list[tuple[int, int]] = []
    rows = stream._rows

    def spy(start: int, stop: int) -> Any:
        read.append((start, stop))
        return rows(start, stop)

    monkeypatch.setattr(stream, "_rows", spy)
    got = [b[:, 0].tolist() for b in Session(group=None, rank=1, world=2).shard(stream)]
    assert got == [[6.0, 9.0], [18.0, 21.0]]  # batches 1 and 3
    assert read == [(2, 4), (6, 8)]  # those rows only, not the whole file


CONVERT = ("convert", "digits-mlp", "--max-samples", "64", "-b", "16", "--no-latency")


@pytest.mark.slow  # real processes, each importing torch
def test_cli_convert_two_ranks_rank0_writes_masks_of_one_process_and_a_rank0_failure_after_the_reduce_stops_both(
        tmp_path: Path) -> None:
    one = invoke(*CONVERT, "-o", tmp_path / "one")
    assert one.exit_code == 0, one.output
    (tmp_path / "two").mkdir()
    done = _launch(_cli(*CONVERT, "-o", "out", "--dist-timeout", "60"), 2, tmp_path / "two")
    assert [p.returncode for p in done] == [0, 0], [p.stderr[-2000:] for p in done]
    assert done[1].stdout == done[1].stderr == ""
    assert done[0].stdout.count("64 calibration samples") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "two" / "out").iterdir()) == ["masks.safetensors", "model.onnx", "report.json"]
    a, b = Masks.load(tmp_path / "one" / "masks.safetensors"), Masks.load(tmp_path / "two" / "out" / "masks.safetensors")
    assert (b.num_samples, b.num_batches) == (a.num_samples, a.num_batches) == (64, 4)
    assert list(a.layers) == list(b.layers) and all(torch.equal(a.layers[n].mask, b.layers[n].mask) for n in a.layers)
    report = json.loads((tmp_path / "two" / "out" / "report.json").read_text())
    assert (report["calibration"]["samples"], report["calibration"]["batches"]) == (64, 4)

    # rank 0 fails after the reduce (validation times out): both exit with its code, one line naming it, nothing left
    (tmp_path / "bad").mkdir()
    done = _launch(_cli(*CONVERT, "-o", "out", "--dist-timeout", "60", "--timeout", "1e-9"), 2, tmp_path / "bad")
    for p in done:
        one_line_error(p, 10, "timed out", start="error: rank 0: validation of ")  # its own code, 10, not 7
        assert p.stdout == ""
    assert list((tmp_path / "bad").iterdir()) == []


@pytest.mark.slow  # real processes, each importing torch
def test_cli_stats_only_two_ranks_equal_one_process_and_a_rank_with_other_weights_is_refused(
        user_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy.calibration.stats import Statistics

    monkeypatch.chdir(user_model)
    monkeypatch.syspath_prepend(str(user_model))
    one = invoke(*_calibrate_args("one.stats.safetensors", "--stats-only")[3:])
    assert one.exit_code == 0, one.output
    done = _launch(_calibrate_args("two.stats.safetensors", "--stats-only"), 2, user_model, PYTHONPATH=str(user_model))
    assert [p.returncode for p in done] == [0, 0], [p.stderr[-2000:] for p in done]
    assert done[1].stdout == done[1].stderr == ""
    assert done[0].stdout.count("statistics of 12 samples") == 1 and done[0].stdout.count("statistics written to") == 1
    a, b = Statistics.load(user_model / "one.stats.safetensors"), Statistics.load(user_model / "two.stats.safetensors")
    assert (a.num_samples, a.num_batches, a.fingerprint) == (b.num_samples, b.num_batches, b.fingerprint)
    assert (b.num_samples, b.num_batches) == (12, 3)
    for name in a.layers:
        for x, y in zip(a[name].parts, b[name].parts):
            assert x.count == y.count and x.value.dtype == y.value.dtype == torch.float64
            assert torch.allclose(x.value, y.value, rtol=1e-12, atol=0), name

    # rank 1's factory initialises other weights: every rank refuses, one line, nothing written
    done = _launch(_calibrate_args("bad.stats.safetensors", "--stats-only"), 2, user_model, PYTHONPATH=str(user_model),
                   SEED_ON_RANK="1")
    for p in done:
        one_line_error(p, 7, start="error: rank 1's model differs from rank 0's")
    assert not (user_model / "bad.stats.safetensors").exists()


def test_the_command_line_keeps_an_array_stream_of_tensors_shardable(tmp_path: Path) -> None:
    """unpadded() wrapped every stream (then each rank would read all the rows): one of tensors has nothing to unpad."""
    from actsparse_deploy.data.batches import unpadded as unpadded_batches
    from actsparse_deploy.data.streams import ArrayStream, array_stream

    np.save(tmp_path / "x.npy", np.zeros((10, 3), dtype=np.float32))
    stream = array_stream(tmp_path / "x.npy", batch_size=4).head(9)
    assert unpadded_batches(stream) is stream
    np.savez(tmp_path / "t.npz", input_ids=np.ones((4, 5), dtype=np.int64), attention_mask=np.array([[1, 1, 0, 0, 0]] * 4))
    tokens = array_stream(tmp_path / "t.npz", batch_size=2)
    assert not isinstance(unpadded_batches(tokens), ArrayStream)
    assert [tuple(b["input_ids"].shape) for b in unpadded_batches(tokens)] == [(4, 2)]  # regrouped without padding


@pytest.mark.parametrize(("world", "argv", "code"), [("2", ["--version"], 0), ("2", ["calibrate"], 2), ("1", ["--version"], None)])
def test_a_process_under_torchrun_ends_without_interpreter_teardown(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                                    world: str, argv: list[str], code: int | None) -> None:
    """gloo's and the TCP store's threads can abort a rank (SIGABRT, "terminate called
    without an active exception") when the interpreter tears them down after the
    other rank has gone, which torchrun reports as a failed job although every
    output is written. Under torchrun the command line ends with os._exit and its
    exit code once stdout and stderr are flushed; one process exits as usual. (The
    race itself cannot be caused on demand: os._exit is replaced here.)"""
    from actsparse_deploy.app import cli

    ended: list[int] = []

    class Ended(BaseException):
        pass

    def fake_exit(status: int) -> None:
        ended.append(status)
        raise Ended

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(sys, "argv", ["actsparse", *argv])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if code is None:
            with pytest.raises(SystemExit) as exited:
                cli.main()
            assert exited.value.code == 0 and ended == []
        else:
            with pytest.raises(Ended):
                cli.main()
            assert ended == [code]
    finally:  # main() installs its own handlers (and ignores signals before os._exit): not this process's
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert capsys.readouterr().out.strip() != "" or code == 2


def test_a_cost_budget_on_another_device_than_the_cpu_is_refused_before_work(tmp_path: Path) -> None:
    """The budget search runs where the data is (the CPU): `max_cost` with a CUDA
    device was silently run on the CPU by convert (the device ignored); now it is
    refused, from Python and from the command line, before the model loads."""
    from actsparse_deploy.app.pipeline import convert

    with pytest.raises(UsageError, match="the cost budget search runs on the CPU"):
        convert("digits-mlp", tmp_path / "out", max_cost="cosine=0.9", device="cuda")
    assert not (tmp_path / "out").exists()
    for command in ("calibrate", "convert"):
        result = invoke(command, "digits-mlp", "--max-cost", "cosine=0.9", "--device", "cuda:0", "-o", tmp_path / command)
        one_line_error(result, 2, "the cost budget search runs on the CPU")
        assert not (tmp_path / command).exists()
    assert convert("digits-mlp", tmp_path / "cpu", max_cost="cosine=0.9", device="cpu", latency=False) is not None  # cpu: fine
