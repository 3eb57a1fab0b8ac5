"""Data-parallel calibration on ``torch.distributed``.

Each rank of a process group runs the model over its share of the calibration
batches (batch ``i`` goes to rank ``i % world``), then the ranks exchange a
status (ok, or the error of the rank that failed) and all-reduce their
statistics in float64 (sums and counts add, maxima take the max) on the
model's device: gloo on CPU, NCCL where the model is on CUDA. Every rank ends
with the statistics of all batches; the command line's rank 0 selects the masks
and writes every output, and tells the other ranks whether it succeeded.

A failure on any rank (an error, a signal) is sent to every other rank, so that
each one raises the same error naming that rank (``rank 1: ...``) with its exit
code; a rank that dies or hangs stops the others within the process group's
timeout (:class:`~actsparse_deploy.errors.CalibrationError`, exit code 7).
Only statistics with a merge rule reduce: a user aggregate is refused first.

What is guaranteed: the reduced statistics equal one process's over the same
batches to float64 rounding (maxima: exactly), whatever the order the ranks add
in. Bit-identical masks are a consequence, not a promise: each batch's partial
is computed in the input's dtype (float32 for a float32 model) and added in
float64, which is exact while every running sum fits float64's 53-bit
significand, i.e. one statistic element's partials span less than about
``2**(29 - log2(batches))`` in magnitude (2**19 for 1000 batches); then the
totals, hence the masks and compensated weights, are bit-identical to one
process, provided each process uses the same number of threads (which fix each
partial's float32 rounding). A float64 model's partials, or sums past that
range, differ in the last bits, and a mask can then differ only where two
scores tie to within that rounding.

Under torchrun the command line does all of this by itself::

    $ torchrun --nproc-per-node 2 -m actsparse_deploy calibrate digits-cnn -o masks.safetensors

From Python, with a process group already initialised (or an explicit one)::

    stats = collect(model, recipe, batches)              # the default group, sharded
    stats = collect(model, recipe, my_shard, group=pg, shard=False)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from .batches import model_device
from .errors import (
    ActsparseError,
    CalibrationError,
    ConfigError,
    DataError,
    ExportError,
    MaskError,
    ModelLoadError,
    OutputError,
    RecipeError,
    SquashError,
    Terminated,
    UsageError,
    ValidationError,
    WeightsError,
    first_line,
)

__all__ = [
    "DEFAULT_TIMEOUT", "Session", "check_budget_device", "check_reducible", "check_timeout", "launched", "resolve_device", "session_for",
    "world_from_env",
]

#: seconds a rank waits for the others at each exchange (torch's own default for gloo)
DEFAULT_TIMEOUT = 1800.0
#: exit code -> the error every rank raises for a rank's failure of that code
_CLASSES: dict[int, type[ActsparseError]] = {
    2: UsageError, 3: RecipeError, 4: ModelLoadError, 5: WeightsError, 6: DataError, 7: CalibrationError, 8: MaskError,
    9: ExportError, 10: ValidationError, 11: OutputError, 12: SquashError,
}


def _digits(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` says yes to "\u00b2", which int() refuses)."""
    return text.isascii() and text.isdigit()


def world_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 where unset); malformed: a usage error."""
    raw = os.environ.get("WORLD_SIZE", "1")
    if not _digits(raw) or int(raw) < 1:
        raise UsageError(f"WORLD_SIZE={raw[:20]!r} is not a positive integer: launch with torchrun or set it to the number of processes")
    return int(raw)


def resolve_device(device: str | None, default: torch.device | None = None) -> torch.device:
    """``"cpu"``, ``"cuda"`` (under torchrun: this rank's ``LOCAL_RANK`` GPU) or
    ``"cuda:N"``; None: ``default`` (where the model's parameters are), else cpu.
    CUDA asked where torch has none is a usage error, before any work."""
    if device is None:
        return default if default is not None else torch.device("cpu")
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and _digits(device[5:]))):
        raise UsageError(f"`device` {device!r} is not one of cpu, cuda, cuda:N")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"`device` {device}: no CUDA device is available to torch here (torch.cuda.is_available() is False): use cpu")
    if device == "cuda":
        local = os.environ.get("LOCAL_RANK", "0")
        index = int(local) if _digits(local) else 0
    else:
        index = int(device[5:])
    if index >= torch.cuda.device_count():
        raise UsageError(f"`device` cuda:{index}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def check_budget_device(max_cost: str | None, device: str | None) -> None:
    """A cost budget (``max_cost``) with a device other than the CPU: a usage
    error before any work (the budget search evaluates the model where its
    tuning data is, on the CPU)."""
    if max_cost is not None and device is not None and device.strip().lower() != "cpu":
        raise UsageError(
            f"the cost budget search runs on the CPU: `max_cost` cannot be given with `device` {device!r} "
            "(calibrate on the device with a sparsity, or search the budget on the CPU)"
        )


def check_reducible(layers: Mapping[str, Any]) -> None:
    """Refuse (:class:`CalibrationError`) a layer whose aggregate is not a
    built-in: its statistic has no rule for adding up across ranks. ``layers``:
    name -> a recipe's resolved layer (``aggregate_fn``) or a ``LayerStats``."""
    from .functions import Aggregate

    for name, config in layers.items():
        fn = getattr(config, "aggregate_fn", None)
        reducible = isinstance(fn, Aggregate) if hasattr(config, "aggregate_fn") else getattr(config, "combine", None) is not None
        if not reducible:
            raise CalibrationError(
                f"layer {name!r}: a user aggregate function's statistic cannot be reduced across ranks (there is no rule for "
                "how its batches combine): use a built-in aggregate_fn, or calibrate in one process"
            )


def _describe(e: BaseException) -> tuple[int, str]:
    """A rank's failure as (exit code, one line)."""
    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted (SIGINT)"
    if isinstance(e, Terminated):
        return 143, "terminated (SIGTERM)"
    if isinstance(e, ActsparseError):
        return e.exit_code, first_line(e, 1000)
    return 1, f"internal error: {type(e).__name__}: {first_line(e)}"


@dataclass
class Session:
    """This process's place in a process group, and the exchanges so far.

    ``sync`` is the one collective every exchange uses (an all-gather of a JSON
    status), so a rank that fails at any point meets the others at whatever
    exchange they are waiting in."""

    group: Any  # a ProcessGroup; None: the default group
    rank: int
    world: int
    timeout: float | None = None
    owned: bool = False  # this session initialised the group (the command line): destroy it at the end
    broken: bool = False  # an exchange failed: no more collectives
    failed: bool = False  # a rank's failure was exchanged
    done: bool = False  # the final outcome was exchanged
    syncs: int = 0

    @property
    def writer(self) -> bool:
        """Rank 0 selects the masks and writes every output."""
        return self.rank == 0

    def shard(self, batches: Iterable[Any]) -> Iterator[Any]:
        """This rank's share of ``batches``: batch ``i`` where ``i % world == rank``,
        taken lazily (a generator is never materialised). A list, or an
        :class:`~actsparse_deploy.streams.ArrayStream` (random access by batch),
        gives only this rank's batches, so each rank reads only its rows of the
        files; any other iterable is run through and the others' batches dropped."""
        from .streams import ArrayStream

        if isinstance(batches, (list, tuple, ArrayStream)):
            for i in range(self.rank, len(batches), self.world):
                yield batches[i]
            return
        for i, batch in enumerate(batches):
            if i % self.world == self.rank:
                yield batch

    def _control_device(self) -> torch.device:
        import torch.distributed as dist

        backend = str(dist.get_backend(self.group))
        if "gloo" in backend:
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def sync(self, status: dict[str, Any], phase: str) -> list[dict[str, Any]]:
        """Every rank's ``status`` (JSON), by rank. A rank that died or does not
        answer within the timeout: :class:`CalibrationError` (and no more exchanges)."""
        import torch.distributed as dist

        if self.broken:
            raise CalibrationError(f"distributed calibration: the process group failed earlier; cannot exchange while {phase}")
        payload = json.dumps({**status, "sync": self.syncs}).encode()
        self.syncs += 1
        device = self._control_device()
        try:
            size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
            sizes = [torch.zeros_like(size) for _ in range(self.world)]
            dist.all_gather(sizes, size, group=self.group)
            longest = int(max(int(s) for s in sizes))
            mine = torch.zeros(longest, dtype=torch.uint8, device=device)
            mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
            gathered = [torch.zeros_like(mine) for _ in range(self.world)]
            dist.all_gather(gathered, mine, group=self.group)
        except RuntimeError as e:  # gloo / NCCL: a peer closed its connection, or the timeout passed
            self.broken = True
            raise self._lost(e, phase) from e
        out = []
        for s, t in zip(sizes, gathered):
            out.append(json.loads(bytes(t[: int(s)].cpu().tolist()).decode()))
        return out

    def _lost(self, e: BaseException, phase: str) -> CalibrationError:
        detail = first_line(e, 200)
        limit = f"{self.timeout:g} s" if self.timeout is not None else "the process group's timeout"
        if "timed out" in detail.lower() or "timeout" in detail.lower():
            what = f"no answer from the other ranks within {limit} (`dist_timeout`) while {phase}: a rank hangs, died, or is slower than that"
        else:
            what = f"lost the connection to another rank while {phase}: a rank died (killed or crashed) or its machine is unreachable"
        return CalibrationError(f"rank {self.rank}: distributed calibration stopped: {what}; see that rank's log ({detail})")

    def fail(self, e: BaseException, phase: str) -> NoReturn:
        """Tell every rank that this one failed with ``e``, then raise the first
        failing rank's error (a signal re-raised as itself on the rank that got it)."""
        code, message = _describe(e)
        try:
            statuses = self.sync({"error": {"code": code, "message": message}}, phase)
        except CalibrationError:
            statuses = [{"error": {"code": code, "message": message}} if r == self.rank else {} for r in range(self.world)]
        self.failed = True
        failing = min(r for r, s in enumerate(statuses) if s.get("error"))
        if failing == self.rank and isinstance(e, (KeyboardInterrupt, Terminated)):
            raise e
        self._raise(failing, statuses[failing]["error"], e)

    def check(self, statuses: list[dict[str, Any]]) -> None:
        """Raise the first failing rank's error where any rank reported one."""
        for rank, status in enumerate(statuses):
            if status.get("error"):
                self.failed = True
                self._raise(rank, status["error"], None)

    @staticmethod
    def _raise(rank: int, error: Mapping[str, Any], cause: BaseException | None) -> NoReturn:
        cls = _CLASSES.get(int(error.get("code", 7)), CalibrationError)
        raise cls(f"rank {rank}: {error.get('message', 'failed')}") from cause

    def reduce(self, local: Any, module: torch.nn.Module, layer_names: list[str], **info: Any) -> Any:
        """The :class:`~actsparse_deploy.stats.Statistics` of every rank's batches.
        ``local``: this rank's ``(per_layer, num_samples, num_batches)``
        (``per_layer`` None where it got no batch); ``info``: recipe, model name."""
        from .functions import STAT_DTYPE, RunningStat
        from .stats import LayerStats, Statistics, model_fingerprint

        per_layer, num_samples, num_batches = local
        fingerprint = model_fingerprint(module, layer_names)
        status = {"batches": num_batches, "samples": num_samples, "fingerprint": fingerprint,
                  "layers": _layout(per_layer) if per_layer is not None else None}
        statuses = self.sync(status, "exchanging the statistics' shapes")
        self.check(statuses)
        self.failed = True  # every rank raises the same error below: nothing more to exchange
        with_data = [r for r, s in enumerate(statuses) if s["layers"] is not None]
        if not with_data:
            raise DataError(f"no calibration batches: the data source is empty (on every one of the {self.world} ranks)")
        first = with_data[0]
        reference = statuses[first]
        for r, s in enumerate(statuses):
            if s["fingerprint"] != reference["fingerprint"]:
                raise CalibrationError(
                    f"rank {r}'s model differs from rank {first}'s (architecture or the masked layers' weights): every rank "
                    "must load the same model and weights (a factory without a fixed seed initialises each rank differently)"
                )
            if s["layers"] is not None:
                _check_layout(reference["layers"], s["layers"], first, r)
        self.failed = False
        device = model_device(module)
        layers: dict[str, LayerStats] = {}
        import torch.distributed as dist

        try:
            for name, row in reference["layers"].items():
                parts = []
                mine = per_layer[name].parts if per_layer is not None else None
                for i, shape in enumerate(row["stat_shapes"]):
                    if mine is not None:
                        value = mine[i].value.to(device=device, dtype=STAT_DTYPE).clone()
                    else:  # the identity of the reduction: this rank saw no batch
                        fill = 0.0 if row["combine"] == "sum" else float("-inf")
                        value = torch.full(shape, fill, dtype=STAT_DTYPE, device=device)
                    op = dist.ReduceOp.SUM if row["combine"] == "sum" else dist.ReduceOp.MAX
                    dist.all_reduce(value, op=op, group=self.group)
                    count = sum(s["layers"][name]["counts"][i] for s in statuses if s["layers"] is not None)
                    parts.append(RunningStat(value, count, row["combine"]))
                totals = {key: sum(s["layers"][name][key] for s in statuses if s["layers"] is not None) for key in ("num_samples", "num_batches")}
                base = per_layer[name] if per_layer is not None else None
                layers[name] = LayerStats(
                    stat=tuple(parts) if row["features"] is not None else parts[0],
                    input_shape=tuple(row["input_shape"]),
                    input_dtype=_dtype(row["input_dtype"]),
                    aggregate=base.aggregate if base is not None else row["aggregate"],
                    features=tuple(row["features"]) if row["features"] is not None else None,
                    feature_dim=row["feature_dim"],
                    layer_types=tuple(row["layer_types"]),
                    **totals,
                )
        except RuntimeError as e:
            self.broken = True
            raise self._lost(e, "reducing the statistics") from e
        return Statistics(
            layers=layers, num_samples=sum(s["samples"] for s in statuses), num_batches=sum(s["batches"] for s in statuses),
            fingerprint=fingerprint, **info,
        )

    def finish(self, phase: str = "finishing") -> None:
        """The last exchange: rank 0 has written every output (it calls this
        after), the other ranks wait here for that; a failure of rank 0 raises
        ``rank 0: ...`` with its exit code on every rank."""
        statuses = self.sync({}, phase if self.writer else "waiting for rank 0 to select the masks and write the outputs")
        self.done = True
        self.check(statuses)

    def close(self) -> None:
        """Destroy the process group this session initialised (not after a
        failed exchange: a dead peer could make that wait)."""
        if self.owned and not self.broken:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _dtype(name: str) -> torch.dtype:
    from .stats import dtype_named

    dtype = dtype_named(name)
    if dtype is None:
        raise CalibrationError(f"a rank reported input dtype {name!r}, which is not a dtype statistics are collected for")
    return dtype


def _layout(per_layer: Mapping[str, Any]) -> dict[str, Any]:
    """What must agree across ranks, and the counts to add, per layer."""
    return {
        name: {
            "aggregate": ls.aggregate, "combine": ls.combine, "features": list(ls.features) if ls.features is not None else None,
            "feature_dim": ls.feature_dim, "stat_shapes": [list(p.value.shape) for p in ls.parts],
            "input_shape": list(ls.input_shape), "input_dtype": str(ls.input_dtype).removeprefix("torch."),
            "counts": [p.count for p in ls.parts], "num_samples": ls.num_samples, "num_batches": ls.num_batches,
            "layer_types": list(ls.layer_types),
        }
        for name, ls in per_layer.items()
    }


def _check_layout(reference: Mapping[str, Any], other: Mapping[str, Any], first: int, rank: int) -> None:
    if list(reference) != list(other):
        raise CalibrationError(f"rank {rank} collected layers {list(other)}, rank {first} layers {list(reference)}: run one recipe on one model")
    for name, row in reference.items():
        for key in ("aggregate", "combine", "features", "feature_dim", "stat_shapes", "input_dtype"):
            if row[key] != other[name][key]:
                raise CalibrationError(
                    f"layer {name!r}: rank {rank} collected a statistic with {key.replace('_', ' ')} {other[name][key]} and rank "
                    f"{first} one with {row[key]}: every rank must see inputs of the same per-sample shape and dtype"
                )


def session_for(group: Any = None) -> Session | None:
    """The session of ``group`` (a ``ProcessGroup``), or of the default group
    where ``group`` is None and torch.distributed is initialised with more than
    one process; None: calibrate in this process alone (also for ``group=False``)."""
    if group is False:
        return None
    if isinstance(group, Session):
        return group
    import torch.distributed as dist

    if group is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return None
        return Session(group=None, rank=dist.get_rank(), world=dist.get_world_size())
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("group= names a process group, but torch.distributed is not initialised: call init_process_group first")
    try:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"group= is not a process group torch.distributed knows: {first_line(e)}") from e
    if rank < 0:
        raise ConfigError("group= is a process group this process is not a member of")
    return Session(group=group, rank=rank, world=world) if world > 1 else None


def check_timeout(timeout: Any) -> None:
    """A positive, finite number of seconds that a ``timedelta`` holds (nan,
    inf, 1e300: a usage error)."""
    ok = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout) and timeout > 0
    if ok:
        try:
            datetime.timedelta(seconds=timeout)
        except OverflowError:
            ok = False
    if not ok:
        raise UsageError(f"`dist_timeout` must be a positive number of seconds, got {timeout!r}")


def _init_from_env(device: torch.device, timeout: float) -> Session:
    """init_process_group from torchrun's variables (env://): gloo, or
    ``cpu:gloo,cuda:nccl`` where the model is on CUDA (the statistics reduce on
    the GPU, the small exchanges on gloo)."""
    import torch.distributed as dist

    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UsageError(f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but {', '.join(missing)} is not set: launch with torchrun")
    world, rank, port = world_from_env(), os.environ["RANK"], os.environ["MASTER_PORT"]
    if not (_digits(rank) and int(rank) < world):  # torch would wait for a rendezvous that cannot happen, then time out
        raise UsageError(f"RANK={rank[:20]!r} is not a rank of WORLD_SIZE={world} (0 to {world - 1}): launch with torchrun")
    if not (_digits(port) and 0 < int(port) < 65536):
        raise UsageError(f"MASTER_PORT={port[:20]!r} is not a port (1 to 65535): launch with torchrun")
    if not dist.is_available():
        raise UsageError("WORLD_SIZE > 1 asks for distributed calibration, but this torch has no torch.distributed")
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise CalibrationError(
            f"rank {os.environ.get('RANK')}: could not join the other {int(os.environ['WORLD_SIZE']) - 1} rank(s) at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout:g} s (`dist_timeout`): {first_line(e, 200)}"
        ) from e
    return Session(group=None, rank=dist.get_rank(), world=dist.get_world_size(), timeout=timeout, owned=True)


@contextlib.contextmanager
def launched(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Session | None]:
    """The command line's session: a process group from torchrun's variables
    where ``WORLD_SIZE`` > 1 (else None). An error raised inside that no
    exchange has carried yet (a rank that could not load its data, rank 0's
    failed write) is sent to the other ranks first, then raised as ``rank N:
    ...``; leaving the block without one is the final exchange
    (:meth:`Session.finish`: rank 0 has written its outputs). The group is
    destroyed at the end. ``timeout`` is checked in one process too (a
    command line that is wrong under torchrun is wrong without it)."""
    check_timeout(timeout)
    if world_from_env() <= 1:
        yield None
        return
    session = _init_from_env(device, float(timeout))
    try:
        yield session
        if not (session.broken or session.failed or session.done):
            session.finish("telling the other ranks that the outputs are written")
    except BaseException as e:
        if not (session.broken or session.failed or session.done):
            session.fail(e, "calibrating" if session.syncs else "preparing to calibrate")
        raise
    finally:
        session.close()
