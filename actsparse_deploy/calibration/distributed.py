"""Data-parallel calibration on ``torch.distributed``.

Each rank of a process group runs the model over its share of the calibration
batches (batch ``i`` goes to rank ``i % world``), then the ranks exchange a
status (ok, or the error of the rank that failed) and all-reduce their
statistics in float64 (sums and counts add, maxima take the max) on the
model's device: gloo on CPU, NCCL where the model is on CUDA. Every rank ends
with the statistics of all batches; the command line's rank 0 selects the masks
and writes every output, and tells the other ranks whether it succeeded. A layer
that no rank called is skipped with a note, as in one process; one that some
ranks called reduces over those. Rank 0 moves its outputs into place only once
it has made sure that no other rank failed meanwhile (:meth:`Session.confirm`).

A failure on any rank (an error, a signal) is sent to every other rank, so that
each one raises the same error naming that rank (``rank 1: ...``) with its exit
code; a rank that dies or hangs stops the others within the process group's
timeout (:class:`~actsparse_deploy.base.errors.CalibrationError`, exit code 7).
Only statistics with a merge rule reduce: a user aggregate is refused first.
The command line's session also posts a failure to the process group's store
the moment it happens: the other ranks stop at their next batch, or in the
exchange they wait in, instead of at the next exchange; and it refuses ranks
that run another command or other options than rank 0 (a usage error).

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
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from ..base.errors import (
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
from ..base.waiting import run_in_worker
from ..data.batches import model_device

__all__ = [
    "DEFAULT_TIMEOUT", "RankFailed", "Session", "check_budget_device", "check_reducible", "check_timeout", "command_settings", "launched",
    "local_rank", "resolve_device", "session_for", "world_from_env",
]

#: seconds a rank waits for the others at each exchange (torch's own default for gloo)
DEFAULT_TIMEOUT = 1800.0
#: exit code -> the error every rank raises for a rank's failure of that code
_CLASSES: dict[int, type[ActsparseError]] = {
    2: UsageError, 3: RecipeError, 4: ModelLoadError, 5: WeightsError, 6: DataError, 7: CalibrationError, 8: MaskError,
    9: ExportError, 10: ValidationError, 11: OutputError, 12: SquashError,
}


#: the largest process count, rank or port c10d takes (a C int)
MAX_PROCESSES = 2**31 - 1
#: the key of the process group's store where the first failing rank posts its failure
_STOP_KEY = "actsparse/stop"
#: the key the ranks' watching threads count up once they have read a posted failure
_READ_KEY = "actsparse/stop-read"
#: seconds between two looks at a pending exchange or rendezvous (the signal handlers run between them)
_POLL = 0.05
#: seconds the rendezvous may take past ``dist_timeout`` before this rank stops waiting (torch's message comes first)
_JOIN_GRACE = 5.0
#: options that may differ between the ranks of one run: one rank's diagnostics, threads and patience, and what only
#: rank 0 writes and prints (where, whether over an earlier file, in which format)
_PER_RANK_OPTIONS = frozenset({"verbose", "threads", "dist_timeout", "output", "overwrite", "as_json"})
#: seconds at most that the rank serving the store waits, after a failure was posted, for every rank to have read it
_LINGER = 5.0


class RankFailed(ActsparseError):
    """Another rank's failure of a class this module has no error for (a signal:
    130, 143; an internal error: 1), raised with that rank's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _PeerFailed(Exception):
    """Raised in this rank's batches once another rank has posted its failure:
    this rank brings it to the exchange instead of a failure of its own."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "failed"))
        self.error = error


def _digits(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` says yes to "\u00b2", which int() refuses)."""
    return text.isascii() and text.isdigit()


def _number(text: str) -> int | None:
    """A launcher variable's non-negative number (at most ``MAX_PROCESSES``), or None."""
    return int(text) if _digits(text) and len(text) <= 10 and int(text) <= MAX_PROCESSES else None


def world_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 where unset); malformed or past what
    c10d takes: a usage error."""
    raw = os.environ.get("WORLD_SIZE", "1")
    world = _number(raw)
    if world is None or world < 1:
        raise UsageError(
            f"WORLD_SIZE={raw[:30]!r} is not a number of processes (1 to {MAX_PROCESSES}): launch with torchrun or set it to the "
            "number of processes"
        )
    return world


def local_rank() -> int:
    """``LOCAL_RANK`` (0 where unset): one of ``LOCAL_WORLD_SIZE``'s ranks where
    that is set, else of ``WORLD_SIZE``'s; anything else is a usage error."""
    world = world_from_env()
    limit, of = world, f"WORLD_SIZE={world}"
    raw_local_world = os.environ.get("LOCAL_WORLD_SIZE", "")
    if raw_local_world:
        local_world = _number(raw_local_world)
        if local_world is None or not 1 <= local_world <= world:
            raise UsageError(f"LOCAL_WORLD_SIZE={raw_local_world[:20]!r} is not a number of processes (1 to WORLD_SIZE={world}): launch with torchrun")
        limit, of = local_world, f"LOCAL_WORLD_SIZE={local_world}"
    raw = os.environ.get("LOCAL_RANK", "")
    if not raw:
        return 0
    value = _number(raw)
    if value is None or value >= limit:
        raise UsageError(f"LOCAL_RANK={raw[:20]!r} is not a local rank of {of} (0 to {limit - 1}): launch with torchrun")
    return value


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
        index = local_rank()
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


def _describe(e: BaseException, rank: int) -> dict[str, Any]:
    """A rank's failure as it is posted and exchanged: the rank it happened on,
    its exit code and one line (another rank's failure brought here: that one)."""
    if isinstance(e, _PeerFailed):
        return e.error
    if isinstance(e, KeyboardInterrupt):
        code, message = 130, "interrupted (SIGINT)"
    elif isinstance(e, Terminated):
        code, message = 143, "terminated (SIGTERM)"
    elif isinstance(e, ActsparseError):
        code, message = e.exit_code, first_line(e, 1000)
    else:
        code, message = 1, f"internal error: {type(e).__name__}: {first_line(e)}"
    return {"rank": rank, "code": code, "message": message}


def _error(error: Mapping[str, Any]) -> ActsparseError:
    """The error every rank raises for a rank's failure: its class's, or its exit code's."""
    code = int(error.get("code", 7))
    message = f"rank {error.get('rank')}: {error.get('message', 'failed')}"
    cls = _CLASSES.get(code)
    return cls(message) if cls is not None else RankFailed(message, code)


@dataclass
class Session:
    """This process's place in a process group, and the exchanges so far.

    ``sync`` is the one collective every exchange uses (an all-gather of a JSON
    status), so a rank that fails at any point meets the others at whatever
    exchange they are waiting in. The command line's session also posts a
    failure to the group's ``store`` at once: a thread of every rank
    (:meth:`watch`) keeps it in ``stop``, and the rank stops at its next batch."""

    group: Any  # a ProcessGroup; None: the default group
    rank: int
    world: int
    timeout: float | None = None
    owned: bool = False  # this session initialised the group (the command line): destroy it at the end
    broken: bool = False  # an exchange failed: no more collectives
    failed: bool = False  # a rank's failure was exchanged
    done: bool = False  # the final outcome was exchanged
    syncs: int = 0
    store: Any = None  # the group's store, where a failure is posted the moment it happens
    serves_store: bool = False  # this process serves that store (rank 0, where torchrun's agent does not): it must outlive the others' reading
    stop: dict[str, Any] | None = None  # the first failure a rank posted (set by the watching thread)
    signal: BaseException | None = None  # a signal this rank got while it waited in an exchange
    confirmed: bool = False  # the exchange before rank 0 moves its outputs into place is over (see confirm)
    left: bool = False  # this rank left an exchange for its signal: close() waits for no reader again

    @property
    def writer(self) -> bool:
        """Rank 0 selects the masks and writes every output."""
        return self.rank == 0

    def shard(self, batches: Iterable[Any]) -> Iterator[Any]:
        """This rank's share of ``batches``: batch ``i`` where ``i % world == rank``,
        taken lazily (a generator is never materialised). A list, or an
        :class:`~actsparse_deploy.data.streams.ArrayStream` (random access by batch),
        gives only this rank's batches, so each rank reads only its rows of the
        files; any other iterable is run through and the others' batches dropped.
        Once another rank has posted its failure, the next batch raises it here."""
        from ..data.streams import ArrayStream

        if isinstance(batches, (list, tuple, ArrayStream)):
            for i in range(self.rank, len(batches), self.world):
                self._stop_here()
                yield batches[i]
            return
        for i, batch in enumerate(batches):
            self._stop_here()
            if i % self.world == self.rank:
                yield batch

    def _stopped(self) -> dict[str, Any] | None:
        """The failure another rank posted, if any."""
        stop = self.stop
        return stop if stop is not None and stop.get("rank") != self.rank else None

    def _stop_here(self) -> None:
        stop = self._stopped()
        if stop is not None:
            raise _PeerFailed(stop)

    def watch(self) -> None:
        """Start the thread that waits for a failure posted to the store and keeps it in ``stop``."""
        if self.store is not None:
            store = self.store.clone()  # a connection of its own: a wait holds the one it runs on
            threading.Thread(target=self._watch, args=(store,), name="actsparse-failure-watch", daemon=True).start()

    def _watch(self, store: Any) -> None:
        import torch.distributed as dist

        while True:
            try:
                store.wait([_STOP_KEY])
                self.stop = json.loads(store.get(_STOP_KEY))
                if self.stop.get("rank") != self.rank:
                    store.add(_READ_KEY, 1)
                return
            except dist.DistStoreError:  # the store's timeout passed: wait on
                continue
            except (RuntimeError, ValueError):  # the store went with the rank that served it: the exchanges say why
                return

    def post(self, error: dict[str, Any]) -> None:
        """Post this rank's failure to the store (the first one posted stays)."""
        if self.store is not None:
            with contextlib.suppress(RuntimeError):  # the store is gone: the exchange that follows says why
                self.store.compare_set(_STOP_KEY, "", json.dumps(error))

    def _posted(self) -> dict[str, Any] | None:
        """The failure another rank posted, asked of the store where the watching thread has not seen one yet."""
        if self._stopped() is None and self.store is not None:
            with contextlib.suppress(RuntimeError, ValueError):  # the store is gone: nothing more to learn
                if self.store.check([_STOP_KEY]):
                    self.stop = json.loads(self.store.get(_STOP_KEY))
        return self._stopped()

    def _control_device(self) -> torch.device:
        import torch.distributed as dist

        backend = str(dist.get_backend(self.group))
        if "gloo" in backend:
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def sync(self, status: dict[str, Any], phase: str) -> list[dict[str, Any]]:
        """Every rank's ``status`` (JSON), by rank. A rank that died or does not
        answer within the timeout: :class:`CalibrationError` (and no more
        exchanges), or the failure that rank posted before it left."""
        import torch.distributed as dist

        if self.broken:
            raise CalibrationError(f"distributed calibration: the process group failed earlier; cannot exchange while {phase}")
        payload = json.dumps({**status, "sync": self.syncs}).encode()
        self.syncs += 1
        device = self._control_device()
        try:
            size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
            sizes = [torch.zeros_like(size) for _ in range(self.world)]
            self._wait(dist.all_gather(sizes, size, group=self.group, async_op=True))
            longest = int(max(int(s) for s in sizes))
            mine = torch.zeros(longest, dtype=torch.uint8, device=device)
            mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
            gathered = [torch.zeros_like(mine) for _ in range(self.world)]
            self._wait(dist.all_gather(gathered, mine, group=self.group, async_op=True))
        except RuntimeError as e:  # gloo / NCCL: a peer closed its connection, or the timeout passed
            self.broken = True
            if self.signal is not None:
                raise self.signal from e
            raise self._broken_by(e, phase) from e
        if self.signal is not None:  # this rank's signal, kept until the others had come to this exchange
            self.failed = True
            raise self.signal
        return [json.loads(bytes(t[: int(s)].cpu().tolist()).decode()) for s, t in zip(sizes, gathered)]

    def _wait(self, work: Any) -> None:
        """Wait for a collective where the signal handlers can run (gloo's own
        wait holds them off until every rank has come). A signal meanwhile is
        posted at once; any rank but the one serving the store leaves at once.
        That one, or a rank that brought its own signal here (:meth:`fail`),
        waits on until every other rank has read the failure (the store ends
        with the rank serving it), at most ``_LINGER`` s; a second signal ends
        that wait at once. Either way it leaves with its first signal."""
        deadline = time.monotonic() + _LINGER
        while True:
            try:
                if work.is_completed():
                    break
                time.sleep(_POLL)
            except (KeyboardInterrupt, Terminated) as e:
                if self.signal is None:
                    self.post(_describe(e, self.rank))
                if self.signal is not None or not self.serves_store:
                    self.broken = self.left = True
                    raise (self.signal or e) from None
                self.signal, deadline = e, time.monotonic() + _LINGER
            if self.signal is not None and (time.monotonic() > deadline or self._read_by_others()):
                self.broken = self.left = True
                raise self.signal
        work.wait()

    def _read_by_others(self) -> bool:
        """Every rank but the one that posted the failure has read it (none posted, or no store to read: True)."""
        if self.store is None:
            return True
        with contextlib.suppress(RuntimeError):  # a store that is gone cannot be read anyway
            return not self.store.check([_STOP_KEY]) or self.store.add(_READ_KEY, 0) >= self.world - 1
        return True

    def _broken_by(self, e: BaseException, phase: str) -> ActsparseError:
        """Why an exchange failed: the failure another rank posted, else a rank that died or hangs."""
        stop = self._posted()
        if stop is not None:
            self.failed = True
            return _error(stop)
        return self._lost(e, phase)

    def _lost(self, e: BaseException, phase: str) -> CalibrationError:
        detail = first_line(e, 200)
        limit = f"{self.timeout:g} s" if self.timeout is not None else "the process group's timeout"
        if "timed out" in detail.lower() or "timeout" in detail.lower():
            what = f"no answer from the other ranks within {limit} (`dist_timeout`) while {phase}: a rank hangs, died, or is slower than that"
        else:
            what = f"lost the connection to another rank while {phase}: a rank died (killed or crashed) or its machine is unreachable"
        return CalibrationError(f"rank {self.rank}: distributed calibration stopped: {what}; see that rank's log ({detail})")

    def fail(self, e: BaseException, phase: str) -> NoReturn:
        """Tell every rank that this one failed with ``e`` (posted at once, then
        exchanged), or bring the failure another rank posted to the exchange; then
        raise the first failing rank's error (a signal re-raised as itself on the
        rank that got it)."""
        error = _describe(e, self.rank)
        if error["rank"] == self.rank:
            self.post(error)
            if isinstance(e, (KeyboardInterrupt, Terminated)) and self.store is not None:
                self.signal = e  # posted: the exchange waits only until the others have read it
        try:
            statuses = self.sync({"error": error}, phase)
        except ActsparseError:  # the others are gone: this rank's own account, and any failure a rank posted
            statuses = [{"error": error}, {"error": self._posted()}]
        self.failed = True
        first = min((s["error"] for s in statuses if s.get("error")), key=lambda err: int(err.get("rank", self.world)))
        if first.get("rank") == self.rank and isinstance(e, (KeyboardInterrupt, Terminated)):
            raise e
        raise _error(first) from e

    def check(self, statuses: list[dict[str, Any]]) -> None:
        """Raise the first failing rank's error where any rank reported one."""
        errors = [s["error"] for s in statuses if s.get("error")]
        if errors:
            self.failed = True
            raise _error(min(errors, key=lambda err: int(err.get("rank", self.world))))

    def agree(self, settings: Mapping[str, Any]) -> None:
        """The first exchange: every rank runs rank 0's command with its options
        (:func:`command_settings`), else a usage error on every rank, naming them."""
        statuses = self.sync({"settings": dict(settings)}, "checking that every rank runs the same command")
        reference = statuses[0]["settings"]
        for rank, status in enumerate(statuses):
            theirs = status["settings"]
            if theirs == reference:
                continue
            self.failed = True
            same = "every rank must run the same command with the same options (start them all with torchrun)"
            if theirs.get("command") != reference.get("command"):
                raise UsageError(f"rank {rank} runs {theirs.get('command')}, rank 0 {reference.get('command')}: {same}")
            names = [name for name in sorted(set(theirs) | set(reference)) if theirs.get(name) != reference.get(name)]
            shown = "; ".join(f"`{name}` {_shown(theirs.get(name))} on rank {rank}, {_shown(reference.get(name))} on rank 0" for name in names)
            raise UsageError(f"rank {rank} runs {theirs.get('command')} with other options than rank 0 ({shown}): {same}")

    def reduce(self, local: Any, module: torch.nn.Module, layer_names: list[str], **info: Any) -> Any:
        """The :class:`~actsparse_deploy.calibration.stats.Statistics` of every rank's batches.
        ``local``: this rank's ``(per_layer, num_samples, num_batches)``
        (``per_layer`` None where it got no batch; a layer this rank never
        called left out); ``info``: recipe, model name. A layer is reduced over
        the ranks that called it; one that no rank called is skipped with a note,
        as in one process (:func:`~actsparse_deploy.calibration.calibrate.uncalled_layers`)."""
        from .stats import Statistics, model_fingerprint

        per_layer, num_samples, num_batches = local
        fingerprint = model_fingerprint(module, layer_names)
        status = {"batches": num_batches, "samples": num_samples, "fingerprint": fingerprint, "selected": list(layer_names),
                  "layers": _layout(per_layer) if per_layer is not None else None}
        statuses = self.sync(status, "exchanging the statistics' shapes")
        self.check(statuses)
        self.failed = True  # every rank raises the same error below: nothing more to exchange
        rows = _agreed_layers(statuses, self.world)
        skipped: dict[str, str] = {}
        uncalled = [name for name in layer_names if name not in rows]
        if uncalled:  # called by no rank: what one process skips (every rank decides alike, from the same statuses)
            from .recipe import uncalled_layers

            skipped = uncalled_layers(module, info["recipe"], uncalled)
            fingerprint = model_fingerprint(module, [name for name in layer_names if name in rows])
        self.failed = False
        device = model_device(module)
        try:
            layers = {name: self._reduce_layer(name, rows[name], per_layer.get(name) if per_layer is not None else None, statuses,
                                               device)
                      for name in layer_names if name in rows}
        except RuntimeError as e:
            self.broken = True
            raise self._broken_by(e, "reducing the statistics") from e
        return Statistics(
            layers=layers, num_samples=sum(s["samples"] for s in statuses), num_batches=sum(s["batches"] for s in statuses),
            fingerprint=fingerprint, skipped=skipped, **info,
        )

    def _reduce_layer(self, name: str, row: Mapping[str, Any], mine: Any, statuses: list[dict[str, Any]], device: torch.device) -> Any:
        """One layer's statistic over every rank that called it (``row``: its
        layout; ``mine``: this rank's ``LayerStats``, None where it never called it)."""
        import torch.distributed as dist

        from .functions import STAT_DTYPE, RunningStat
        from .stats import layer_from_row, part_shapes

        rows = [s["layers"][name] for s in statuses if s["layers"] is not None and name in s["layers"]]
        count = sum(r["count"] for r in rows)
        parts = []
        for i, shape in enumerate(part_shapes(row)):
            if mine is not None:
                value = mine.parts[i].value.to(device=device, dtype=STAT_DTYPE).clone()
            else:  # the identity of the reduction: this rank saw no batch, or never called the layer
                fill = 0.0 if row["combine"] == "sum" else float("-inf")
                value = torch.full(shape, fill, dtype=STAT_DTYPE, device=device)
            op = dist.ReduceOp.SUM if row["combine"] == "sum" else dist.ReduceOp.MAX
            dist.all_reduce(value, op=op, group=self.group)
            parts.append(RunningStat(value, count, row["combine"]))
        return layer_from_row(
            row, parts, _dtype(row["input_dtype"]), aggregate=mine.aggregate if mine is not None else row["aggregate"],
            num_samples=sum(r["num_samples"] for r in rows), num_batches=sum(r["num_batches"] for r in rows),
        )

    def confirm(self) -> None:
        """Rank 0, its outputs staged, right before it moves them into place: a
        failure of another rank raises here (that rank's error), so that a job
        that failed publishes nothing. The command line's session (which ends
        with :meth:`finish`) first meets the other ranks in an exchange, which
        fails where one died or left since; then any failure posted to the store
        meanwhile is raised. What is left: a rank that fails after that look,
        while rank 0 renames its files, is told at the last exchange only."""
        if self.owned and not self.confirmed:
            self.confirmed = True
            self.check(self.sync({}, "making sure every rank is still there before writing the outputs"))
        stop = self._posted()
        if stop is not None:
            self.failed = True
            raise _error(stop)

    def finish(self, phase: str = "finishing") -> None:
        """The last exchange: rank 0 has written every output (it calls this
        after), the other ranks wait here for that; a failure of rank 0 raises
        ``rank 0: ...`` with its exit code on every rank. The command line's
        session meets rank 0's :meth:`confirm` exchange first."""
        waiting = "waiting for rank 0 to select the masks and write the outputs"
        if self.owned and not self.confirmed:
            self.confirmed = True
            self.check(self.sync({}, phase if self.writer else waiting))
        statuses = self.sync({}, phase if self.writer else waiting)
        self.done = True
        self.check(statuses)

    def close(self) -> None:
        """Destroy the process group this session initialised (not after a
        failed exchange: a dead peer could make that wait). Where this process
        serves the store and a failure was posted, it first waits (at most
        ``_LINGER`` s) for every other rank than the one that posted it to have
        read it: the store ends with this process."""
        if self.serves_store and self.store is not None and not self.left:
            deadline = time.monotonic() + _LINGER
            while not self._read_by_others() and time.monotonic() < deadline:
                time.sleep(_POLL)
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
    """What must agree across ranks, and the counts to add, per layer: each layer's
    statistics-file row (:func:`~actsparse_deploy.calibration.stats.layer_row`)."""
    from .stats import layer_row

    return {name: layer_row(ls) for name, ls in per_layer.items()}


def _agreed_layers(statuses: list[dict[str, Any]], world: int) -> dict[str, dict[str, Any]]:
    """Every layer some rank called -> its layout (that of the first rank that
    called it), once the ranks are shown to agree: the same selected layers, the
    same model, and the same statistic of each layer wherever it was called."""
    with_data = [r for r, s in enumerate(statuses) if s["layers"] is not None]
    if not with_data:
        raise DataError(f"no calibration batches: the data source is empty (on every one of the {world} ranks)")
    for r, s in enumerate(statuses):
        if s["selected"] != statuses[0]["selected"]:
            raise CalibrationError(f"rank {r} selected layers {s['selected']}, rank 0 layers {statuses[0]['selected']}: run one recipe on one model")
    first = with_data[0]
    for r, s in enumerate(statuses):
        if s["fingerprint"] != statuses[first]["fingerprint"]:
            raise CalibrationError(
                f"rank {r}'s model differs from rank {first}'s (architecture or the masked layers' weights): every rank "
                "must load the same model and weights (a factory without a fixed seed initialises each rank differently)"
            )
    rows: dict[str, dict[str, Any]] = {}
    owner: dict[str, int] = {}
    for r in with_data:
        for name, row in statuses[r]["layers"].items():
            if name in rows:
                _check_layer(name, rows[name], row, owner[name], r)
            else:
                rows[name], owner[name] = row, r
    return rows


#: what every rank that called a layer must agree on (``stat_shapes``: each part's shape)
_AGREED = ("aggregate", "combine", "features", "feature_dim", "stat_shapes", "input_dtype")


def _check_layer(name: str, reference: Mapping[str, Any], other: Mapping[str, Any], first: int, rank: int) -> None:
    from .stats import part_shapes

    reference, other = {**reference, "stat_shapes": part_shapes(reference)}, {**other, "stat_shapes": part_shapes(other)}
    for key in _AGREED:
        if reference[key] != other[key]:
            raise CalibrationError(
                f"layer {name!r}: rank {rank} collected a statistic with {key.replace('_', ' ')} {other[key]} and rank "
                f"{first} one with {reference[key]}: every rank must see inputs of the same per-sample shape and dtype"
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


def _check_launch_env() -> tuple[int, int]:
    """torchrun's variables, checked before any work: (world, rank)."""
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    world = world_from_env()
    if missing:
        raise UsageError(f"WORLD_SIZE is {world} but {', '.join(missing)} is not set: launch with torchrun")
    raw_rank, raw_port = os.environ["RANK"], os.environ["MASTER_PORT"]
    rank, port = _number(raw_rank), _number(raw_port)
    if rank is None or rank >= world:  # torch would wait for a rendezvous that cannot happen, then time out
        raise UsageError(f"RANK={raw_rank[:20]!r} is not a rank of WORLD_SIZE={world} (0 to {world - 1}): launch with torchrun")
    if port is None or not 0 < port < 65536:
        raise UsageError(f"MASTER_PORT={raw_port[:20]!r} is not a port (1 to 65535): launch with torchrun")
    local_rank()
    return world, rank


def _join(backend: str, timeout: float, rank: int) -> None:
    """init_process_group in a thread of its own while this one waits: the
    rendezvous waits in C++, where the signal handlers cannot run (a SIGTERM
    would wait for the timeout), and a rank's retries to connect can take twice
    the timeout. A signal ends the wait at once; so does the timeout, with a
    few seconds' grace for torch's own message."""
    import torch.distributed as dist

    def join() -> None:
        dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout))

    run_in_worker(join, name="actsparse-rendezvous", deadline=time.monotonic() + timeout + _JOIN_GRACE, poll=_POLL,
                  expired=lambda: TimeoutError("rank 0, which holds the rendezvous, did not answer" if rank else "not every rank came"))


def _init_from_env(device: torch.device, timeout: float) -> Session:
    """init_process_group from torchrun's variables (env://): gloo, or
    ``cpu:gloo,cuda:nccl`` where the model is on CUDA (the statistics reduce on
    the GPU, the small exchanges on gloo); then the thread that watches the
    group's store for a failure posted by any rank."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    world, rank = _check_launch_env()
    if not dist.is_available():
        raise UsageError("WORLD_SIZE > 1 asks for distributed calibration, but this torch has no torch.distributed")
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        _join(backend, timeout, rank)
        session = Session(group=None, rank=dist.get_rank(), world=dist.get_world_size(), timeout=timeout, owned=True,
                          store=_get_default_store(), serves_store=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True")
        session.watch()
    except (RuntimeError, ValueError, TimeoutError) as e:
        raise CalibrationError(
            f"rank {rank}: could not join the other {world - 1} rank(s) at {where} within {timeout:g} s (`dist_timeout`): "
            f"{first_line(e, 200).rstrip('.')}; start every rank with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        ) from e
    return session


def _setting(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_setting(v) for v in value]
    return str(getattr(value, "value", value))  # an Enum by its value, a Path as written


def _shown(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)[:80]


def command_settings(command: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """What every rank of a distributed run must agree on: the command and its
    options as parsed (so their order and spelling do not matter), less what
    may differ per rank: what tunes one host (``threads``, ``dist_timeout``, a
    CUDA device's index: ranks started by hand may each name their GPU), what
    only rank 0 writes and prints (``output``, ``overwrite``, ``as_json``) and
    ``verbose``. What changes the computation is compared.

    >>> from pathlib import Path
    >>> command_settings("calibrate", {"sparsity": 0.5, "device": "cuda:1", "output": Path("m.pt"), "threads": 2, "verbose": True})
    {'command': 'calibrate', 'sparsity': 0.5, 'device': 'cuda'}
    """
    settings: dict[str, Any] = {"command": command}
    for name, value in options.items():
        if name in _PER_RANK_OPTIONS:
            continue
        if name == "device" and isinstance(value, str) and value.startswith("cuda:"):
            value = "cuda"
        settings[name] = _setting(value)
    return settings


@contextlib.contextmanager
def launched(device: torch.device, timeout: float = DEFAULT_TIMEOUT,
             command: tuple[str, Mapping[str, Any]] | None = None) -> Iterator[Session | None]:
    """The command line's session: a process group from torchrun's variables
    where ``WORLD_SIZE`` > 1 (else None). An error raised inside that no
    exchange has carried yet (a rank that could not load its data, rank 0's
    failed write) is sent to the other ranks first, then raised as ``rank N:
    ...``; leaving the block without one is the final exchange
    (:meth:`Session.finish`: rank 0 has written its outputs). The group is
    destroyed at the end. ``timeout`` is checked in one process too (a
    command line that is wrong under torchrun is wrong without it).
    ``command``: the command's name and options, which every rank must share
    (the first exchange; :func:`command_settings`)."""
    check_timeout(timeout)
    if world_from_env() <= 1:
        yield None
        return
    session = _init_from_env(device, float(timeout))
    started = 0
    try:
        if command is not None:
            session.agree(command_settings(*command))
            started = session.syncs
        yield session
        if not (session.broken or session.failed or session.done):
            session.finish("telling the other ranks that the outputs are written")
    except BaseException as e:
        if not (session.broken or session.failed or session.done):
            session.fail(e, "calibrating" if session.syncs > started else "preparing to calibrate")
        raise
    finally:
        session.close()
