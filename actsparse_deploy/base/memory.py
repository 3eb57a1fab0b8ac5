"""Memory: how much the machine has free, how much this process holds, and ``--max-memory``.

``convert`` holds the model's weights once in PyTorch and once in onnxruntime while it
validates (squash works in place; the dense model's outputs are recorded first), and
onnxruntime's latency check times two models side by side. :func:`memory_plan` says,
from the weights' size, whether that fits what the user allows (``--max-memory``,
default: what the machine has free); else whether validating in two passes (the PyTorch
outputs first, then onnxruntime alone) and timing one session at a time fit; else that
it cannot fit at all (a :class:`~actsparse_deploy.base.errors.MemoryBudgetError`, exit 13,
before any work).

    >>> parse_memory("8GB"), parse_memory("1.5 GiB"), parse_memory("512MB")
    (8000000000, 1610612736, 512000000)
    >>> memory_plan(2 * 10**9, budget=10 * 10**9, held=3 * 10**8).one_at_a_time
    False
    >>> memory_plan(2 * 10**9, budget=48 * 10**8, held=3 * 10**8).one_at_a_time
    True
    >>> memory_plan(2 * 10**9, budget=35 * 10**8, held=3 * 10**8).apart
    True
    >>> memory_plan(10**9, budget=35 * 10**8, held=3 * 10**8, half=True).one_at_a_time  # a float16 session holds twice its file
    True
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import MemoryBudgetError, UsageError

__all__ = [
    "APART", "BLOCK", "CALIBRATE", "HALF_RUNTIME", "SIDE_BY_SIDE", "VALIDATE", "CalibrationPlan", "MemoryPlan", "available_memory",
    "calibration_plan", "format_bytes", "memory_plan", "parse_memory", "peak_memory", "resident_memory",
]

#: what validation holds, in weights: PyTorch's copy and onnxruntime's (its weights prepacked, one tensor more at the peak)
VALIDATE = 2.2
#: what the latency check holds timing the dense and the converted model side by side, in weights: two sessions
SIDE_BY_SIDE = 2.3
#: what a run holds with validation in two passes and one session at a time, in weights: one copy, its largest tensors
#: twice while a stage swaps them, and the outputs kept
APART = 1.4
#: what onnxruntime's CPU provider holds of a float16 model, per byte of its weights: it runs float16 MatMuls in float32
#: and keeps the weights cast (measured: 1.82 GB of float16 weights, a decoder of TinyLlama's shape, a 4.0-4.6 GB session;
#: ``tools/measure_session_memory.py``)
HALF_RUNTIME = 2.0

#: what ``calibrate`` holds, in weights: the model, and a batch's activations beside it
CALIBRATE = 1.2
#: what calibrating block by block holds of its largest block, in that block's weights: the weights read from
#: their file, the same cast to the model's dtype, and the block's activations on a batch
BLOCK = 3.0

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str | int) -> int:
    """Bytes from ``8GB``, ``1.5 GiB``, ``512MB`` or a number of bytes; a UsageError (exit 2) otherwise."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0 or match.group(2) not in _UNITS:
        raise UsageError(f"--max-memory takes an amount like 8GB, 1.5GiB or 512MB, not {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    """``3.21 GB``: decimal units, as ``--max-memory`` takes them."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def available_memory() -> int | None:
    """What the machine has free for a new allocation (``MemAvailable`` of ``/proc/meminfo``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory() -> int:
    """This process's peak resident memory so far, in bytes (``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_memory() -> int:
    """This process's resident memory now, in bytes (0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class MemoryPlan:
    """How ``convert`` runs within ``budget`` bytes: ``one_at_a_time``, the latency check times the dense
    and the converted model one after the other (a session at a time) instead of side by side; ``apart``,
    validation runs in two passes (the PyTorch outputs first, the weights let go, then onnxruntime alone)."""

    budget: int | None
    need: int
    one_at_a_time: bool
    apart: bool = False
    #: the model's weights, in bytes
    weights: int = 0
    #: the budget is the user's (``--max-memory``)
    asked: bool = False
    #: what onnxruntime holds of the model, per byte of its weights (:data:`HALF_RUNTIME` for float16)
    runtime: float = 1.0

    @property
    def said(self) -> bool:
        """Whether the report says it (a budget asked for, or one that changed how the run went)."""
        return self.asked or self.apart or self.one_at_a_time

    def sessions_fit(self, held: int | None = None) -> bool:
        """Whether the latency check's two sessions side by side fit the budget beside ``held`` bytes
        (default: what the process holds now, :func:`resident_memory`, known only once the stages
        before it ran: a decoder's cache validation and an exporter's leftovers are not in the plan).

        >>> plan = memory_plan(10**9, budget=4 * 10**9, held=10**8)
        >>> plan.one_at_a_time, plan.sessions_fit(held=10**8), plan.sessions_fit(held=2 * 10**9)
        (False, True, False)
        """
        held = resident_memory() if held is None else held
        return self.budget is None or held + int(SIDE_BY_SIDE * self.runtime * self.weights) <= self.budget

    def to_json(self) -> dict[str, int | bool | None]:
        """The report's ``memory`` section, with the process's peak so far (:func:`peak_memory`)."""
        return {"peak_bytes": peak_memory(), "weights_bytes": self.weights, "budget_bytes": self.budget, "apart": self.apart,
                "one_at_a_time": self.one_at_a_time}


def memory_plan(weights: int, budget: int | None = None, held: int | None = None, asked: bool = False,
                can_part: bool = True, loaded: bool = False, what: str = "convert", half: bool = False) -> MemoryPlan:
    """The plan for a model of ``weights`` bytes in a process that holds ``held`` bytes beside them
    (default: :func:`resident_memory`, less the weights where the model is ``loaded`` already),
    within ``budget`` (default: :func:`available_memory` plus what the process holds): side by side
    (:data:`VALIDATE`); else, where ``can_part`` (a model validated without a cache), in two passes and a session at a time (:data:`APART`); else a
    :class:`MemoryBudgetError`. ``asked``: the budget is the user's ``--max-memory`` (said so in the message);
    ``what``: the command, as the message names it; ``half``: the ONNX model is float16 (onnxruntime holds it in float32:
    :data:`HALF_RUNTIME`)."""
    if held is None:
        now = resident_memory()
        held = max(0, now - weights) if loaded else now
        if budget is None:
            free = available_memory()
            budget = None if free is None else free + now
    elif budget is None:
        free = available_memory()
        budget = None if free is None else free + held
    runtime = HALF_RUNTIME if half else 1.0  # onnxruntime's copy, per byte of the weights PyTorch holds
    need = held + int((1 + (VALIDATE - 1) * runtime) * weights)
    if budget is None or need <= budget:
        plan = MemoryPlan(budget, need, False, weights=weights, asked=asked, runtime=runtime)
        return replace(plan, one_at_a_time=not plan.sessions_fit(held))
    parted = held + int(max(APART, (VALIDATE - 1) * runtime) * weights)
    if can_part and parted <= budget:
        return MemoryPlan(budget, parted, True, apart=True, weights=weights, asked=asked, runtime=runtime)
    allowed = f"--max-memory {format_bytes(budget)}" if asked else f"the {format_bytes(budget)} this machine has free"
    how = ("once by PyTorch, then by onnxruntime" if can_part else "once by PyTorch and once by onnxruntime while a decoder with its "
           "cache is validated")
    how += ", which holds float16 weights as float32" if half else ""
    raise MemoryBudgetError(
        f"the model's weights ({format_bytes(weights)}) need about {format_bytes(parted if can_part else need)} to {what} (held {how}, "
        f"beside {format_bytes(held)} already in use), over {allowed}: free memory, or {what} on a machine with more (`calibrate "
        "--max-memory` makes the masks of a Hugging Face model block by block)")


@dataclass(frozen=True)
class CalibrationPlan:
    """How ``calibrate`` runs within ``budget`` bytes: the whole model in memory, or ``by_block`` (its
    blocks' weights left in their files, each layer's read while it runs); the statistics of all layers at
    once, or of ``blocks_per_pass`` blocks at a time (the batches run once per pass); ``need``: about what it holds."""

    budget: int | None
    weights: int
    by_block: bool
    need: int
    asked: bool = False
    blocks_per_pass: int | None = None


def calibration_plan(weights: int, budget: int | None = None, held: int | None = None, asked: bool = False, *, statistics: int = 0,
                     rest: int | None = None, block: int | None = None, per_block: Sequence[int] | None = None,
                     selecting: int = 0) -> CalibrationPlan:
    """The plan for calibrating a model of ``weights`` bytes whose recipe's statistics take ``statistics``
    bytes, in a process that holds ``held`` bytes (default: :func:`resident_memory`) within ``budget``
    (default: what the machine has free, plus ``held``). In this order, the first that fits: the whole model
    (:data:`CALIBRATE` times its weights) and all statistics; the whole model and the statistics of as many
    blocks at a time as fit (``per_block``: each block's statistics, then those of the layers outside the
    blocks; None: not in passes); block by block where the model has blocks (``block``: its largest block's
    bytes, ``rest``: its weights outside the blocks; None: it cannot be split: the rest, :data:`BLOCK` times one
    block) with all statistics, then in passes; else a :class:`MemoryBudgetError` (exit 13) naming what it needs.
    ``selecting``: what choosing one layer's mask holds beside the statistics, counted in each.

    >>> calibration_plan(10**9, budget=2 * 10**9, held=10**8).by_block
    False
    >>> calibration_plan(10**9, budget=10**9, held=10**8, rest=10**8, block=5 * 10**7).need
    350000000
    >>> plan = calibration_plan(10**9, budget=2 * 10**9, held=10**8, statistics=2 * 10**9, per_block=[2 * 10**8] * 10 + [0])
    >>> plan.by_block, plan.blocks_per_pass
    (False, 3)
    """
    held = resident_memory() if held is None else held
    if budget is None:
        free = available_memory()
        budget = None if free is None else free + held
    fixed = [(False, held + int(CALIBRATE * weights) + selecting)]
    if block is not None:
        fixed.append((True, held + (rest or 0) + int(BLOCK * block) + selecting))
    for by_block, base in fixed:
        if budget is None or base + statistics <= budget:
            return CalibrationPlan(budget, weights, by_block, base + statistics, asked)
        most = max(per_block[:-1], default=0) if per_block else 0
        if per_block and most > 0 and base + most + per_block[-1] <= budget:
            k = min(len(per_block) - 1, (budget - base - per_block[-1]) // most)
            return CalibrationPlan(budget, weights, by_block, base + k * most + per_block[-1], asked, blocks_per_pass=int(k))
    assert budget is not None
    allowed = f"--max-memory {format_bytes(budget)}" if asked else f"the {format_bytes(budget)} this machine has free"
    least = max(per_block[:-1], default=0) + per_block[-1] if per_block else statistics
    stats = f"statistics {format_bytes(least)}{' (one block at a time)' if per_block else ''}, beside {format_bytes(held)} held"
    base = fixed[-1][1]
    how = (f"block by block needs about {format_bytes(base + least)} (one block's weights, {format_bytes(block or 0)}, at a time; {stats})"
           if block is not None else
           f"needs about {format_bytes(base + least)} ({stats}); only a Hugging Face model directory calibrates block by block")
    raise MemoryBudgetError(
        f"calibrating the model (weights {format_bytes(weights)}) {how}, over {allowed}: free memory, give the recipe fewer layers "
        "or a method without a Gram matrix, or calibrate on a machine with more"
    )
