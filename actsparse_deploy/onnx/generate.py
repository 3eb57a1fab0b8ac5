"""Generation through a decoder with a KV cache: the check that the ONNX decoder
generates what the PyTorch model does, and its decode speed.

A decoder exported with its cache takes ``input_ids``, ``attention_mask`` (past
and new tokens), ``position_ids`` (where it has them) and
``past_key_values.{i}.key`` / ``.value`` ``(batch, kv heads, past, head dim)``,
and returns ``logits`` and ``present.{i}.key`` / ``.value``: Optimum's
``text-generation-with-past`` names. It is run here as a serving loop runs it
(batch 1): the prompt, then one token at a time, each step's ``present`` fed
back as the next step's past, the mask one longer, the positions continuing.
The cache's names and shapes are read from the ONNX session's inputs
(:class:`DecoderIO`); the PyTorch side is any module called with the same named
tensors that returns ``(logits, *present)`` in the inputs' layer order.

- :func:`check_generation` (validation): (a) each held-out prompt fed in two
  parts, a prefill of its first half then one token at a time (and once whole),
  gives the logits of one full PyTorch pass; (b) greedy decoding of
  ``new_tokens`` tokens from there, the ONNX decoder against the PyTorch module
  each with its own cache: identical tokens, logits within the tolerance at
  every step. A mismatch is a one-line :class:`ValidationError`.
- :func:`decode_latency`: milliseconds per new token of a dense and a converted
  decoder under onnxruntime, alternated, the median.

Greedy is the argmax at every step, on both sides from numpy (the first index of
a tie). Neither side stops at an end-of-sequence token, nor masks it: both loops
run the same rules for the full count. (``generate(min_new_tokens=...)`` masks
EOS instead; what is compared here is the two loops, not ``generate``.)

The held-out prompts are rows without left padding or holes, cut to their
tokens and to ``max_tokens``:

    >>> import torch
    >>> from actsparse_deploy.onnx.generate import held_out_prompts
    >>> batch = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0], [0, 12, 13, 14]]),
    ...          "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]])}
    >>> [p.tolist() for p in held_out_prompts([batch], 3, max_tokens=3)]
    [[5, 6, 7], [9, 10, 11]]
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..base.constants import DEFAULT_ATOL, DEFAULT_RTOL
from ..base.errors import ValidationError, first_line
from ..data.batches import Batch, model_device
from ..data.compare import OutputDiff, Tolerance
from ..nn.modules import eval_mode
from .latency import ort_session, time_variants, torch_threads
from .validate import onnx_session, run_session

__all__ = [
    "DECODE_RUNS", "DECODE_TOKENS", "DECODE_WARMUP", "DecoderIO", "Decoding", "GenerationReport", "Step",
    "check_generation", "decode_latencies", "decode_latency", "decode_pair", "greedy", "held_out_prompts", "onnx_step", "torch_step",
]

#: :func:`check_generation`'s defaults: prompts, new tokens each, the longest prompt (tokens)
GENERATION_PROMPTS = 3
GENERATION_TOKENS = 32
PROMPT_TOKENS = 64
#: :func:`decode_latency`'s defaults: new tokens timed per run, warm-up and timed runs per decoder
DECODE_TOKENS = 64
DECODE_WARMUP = 1
DECODE_RUNS = 7

#: one decoding step: the named feeds in; ``[logits, *present]`` out, present in :attr:`DecoderIO.past`'s order
Step = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
#: the inputs a generate loop feeds besides the cache (``position_ids`` only where the graph takes it)
_STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
# onnxruntime's input type names -> numpy dtypes (those a decoder's inputs have)
_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
           "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class DecoderIO:
    """A decoder graph's inputs as the generate loop feeds them (read by :meth:`of`)."""

    #: every input the graph takes
    inputs: tuple[str, ...]
    #: the cache inputs, layer by layer, key then value
    past: tuple[str, ...]
    kv_heads: int
    head_dim: int
    #: each input's numpy dtype
    dtypes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def present(self) -> tuple[str, ...]:
        """The outputs that hold the cache after a step, in :attr:`past`'s order."""
        return tuple("present." + name.removeprefix("past_key_values.") for name in self.past)

    @classmethod
    def of(cls, session: Any, where: str | Path) -> DecoderIO:
        """Read from an onnxruntime session; a graph that is no decoder with a cache is a :class:`ValidationError`."""
        declared = {i.name: i for i in session.get_inputs()}
        layers: dict[int, set[str]] = {}
        for name in declared:
            if match := _PAST.fullmatch(name):
                layers.setdefault(int(match[1]), set()).add(match[2])
        if not layers:
            raise ValidationError(f"{where} has no past_key_values.{{i}}.key / .value inputs: not a decoder with a KV cache "
                                  f"(it takes {', '.join(declared)}); export it with its cache")
        if sorted(layers) != list(range(len(layers))) or any(kv != {"key", "value"} for kv in layers.values()):
            raise ValidationError(f"{where}: its cache inputs are not a key and a value for each of layers 0 to {max(layers)}")
        other = [name for name in declared if name not in _STEP_INPUTS and not _PAST.fullmatch(name)]
        if "input_ids" not in declared or "attention_mask" not in declared or other:
            raise ValidationError(f"{where}: a decoder with a cache takes input_ids, attention_mask, position_ids and the cache; "
                                  f"it takes {', '.join(declared)}")
        past = tuple(f"past_key_values.{i}.{kv}" for i in range(len(layers)) for kv in ("key", "value"))
        shapes = {tuple(declared[name].shape or ()) for name in past}
        shape = next(iter(shapes))
        if len(shapes) != 1 or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise ValidationError(f"{where}: its cache inputs must be (batch, kv heads, past, head dim) with kv heads "
                                  f"and head dim fixed, all alike; they are {sorted(map(list, shapes), key=str)}")
        outputs = {o.name for o in session.get_outputs()}
        missing = [name for name in ("logits", *(f"present.{n.removeprefix('past_key_values.')}" for n in past)) if name not in outputs]
        if missing:
            raise ValidationError(f"{where}: a decoder with a cache returns logits and present.{{i}}.key / .value; "
                                  f"it lacks {', '.join(missing)}")
        dtypes = {name: _DTYPES.get(meta.type, np.float32 if name in past else np.int64) for name, meta in declared.items()}
        return cls(tuple(declared), past, shape[1], shape[3], dtypes)

    def feeds(self, tokens: np.ndarray, length: int, past: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """One step's feeds: ``tokens`` ``(1, n)`` after ``length`` tokens whose cache is ``past`` (None: the first step)."""
        total = length + tokens.shape[1]
        feeds = {"input_ids": tokens.astype(self.dtypes["input_ids"]),
                 "attention_mask": np.ones((1, total), self.dtypes["attention_mask"])}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(length, total)[None].astype(self.dtypes["position_ids"])
        if past is None:
            past = {name: np.zeros((1, self.kv_heads, 0, self.head_dim), self.dtypes[name]) for name in self.past}
        feeds.update(past)
        return feeds


def onnx_step(session: Any, io: DecoderIO, deadline: float | None = None, *, interruptible: bool = True) -> Step:
    """A step through an onnxruntime session: interruptible (a signal or the
    ``time.monotonic()`` ``deadline`` stops onnxruntime, :func:`~actsparse_deploy.onnx.validate.run_session`),
    or a plain ``session.run`` (timing)."""
    wanted = ["logits", *io.present]
    if not interruptible:
        return lambda feeds: list(session.run(wanted, feeds))
    names = [o.name for o in session.get_outputs()]
    order = [names.index(name) for name in wanted]

    def step(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = run_session(session, feeds, deadline)
        return [outputs[i] for i in order]

    return step


def torch_step(module: Any, io: DecoderIO) -> Step:
    """A step through a PyTorch module called with the same named tensors (no grad, on the module's device)."""
    device = model_device(module) if isinstance(module, torch.nn.Module) else torch.device("cpu")

    def step(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from ..data.batches import flatten_outputs

        with torch.no_grad():
            out = flatten_outputs(module(**{name: torch.from_numpy(a).to(device) for name, a in feeds.items()}))
        if len(out) != 1 + len(io.past):
            raise ValidationError(f"the PyTorch module returns {len(out)} tensors, the decoder logits and {len(io.past)} for its cache")
        return [t.detach().cpu().numpy() for t in out]

    return step


class Decoding:
    """One sequence decoded through one step, its cache kept between calls."""

    def __init__(self, step: Step, io: DecoderIO) -> None:
        self.step, self.io = step, io
        self.past: dict[str, np.ndarray] | None = None
        self.length = 0

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        """``tokens`` ``(1, n)`` after those fed so far: their logits ``(1, n, vocab)``."""
        logits, *present = self.step(self.io.feeds(tokens, self.length, self.past))
        self.length += tokens.shape[1]
        held = present[0].shape[2] if present and present[0].ndim == 4 else None
        if held != self.length:
            raise ValidationError(f"{self.io.present[0]} holds {held} positions after {self.length} tokens: "
                                  "the cache must return every position to be fed back")
        self.past = dict(zip(self.io.past, present))
        return logits


def greedy(step: Step, io: DecoderIO, prompt: np.ndarray, new_tokens: int) -> list[int]:
    """The ``new_tokens`` tokens greedy decoding picks after ``prompt`` (1-D ids) through ``step``."""
    decoding = Decoding(step, io)
    logits = decoding.feed(prompt[None])
    tokens: list[int] = []
    for i in range(new_tokens):
        tokens.append(int(np.argmax(logits[0, -1])))
        if i + 1 < new_tokens:
            logits = decoding.feed(np.array([[tokens[-1]]]))
    return tokens


def _ids_and_mask(batch: Batch) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        return batch.get("input_ids"), batch.get("attention_mask")
    if isinstance(batch, (tuple, list)):
        return (batch[0], batch[1] if len(batch) > 1 else None) if batch else (None, None)
    return batch, None


def held_out_prompts(batches: Iterable[Batch], count: int = GENERATION_PROMPTS, max_tokens: int | None = PROMPT_TOKENS) -> list[np.ndarray]:
    """The first ``count`` rows of held-out token batches (``input_ids`` with an
    ``attention_mask``, or ids alone) that hold 2 tokens or more with no left
    padding or holes, each cut to its tokens and to ``max_tokens`` (None: no cap);
    int64 arrays. Fewer where there are fewer; none is a :class:`ValidationError`."""
    found: list[np.ndarray] = []
    for batch in batches:
        ids, mask = _ids_and_mask(batch)
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point():
            raise ValidationError("generation needs held-out token batches: input_ids (batch, tokens) of integers")
        mask = torch.ones_like(ids) if mask is None else mask
        for row in range(ids.shape[0]):
            length = int((mask[row] != 0).sum())
            if length < 2 or not bool((mask[row, :length] != 0).all()):
                continue
            found.append(ids[row, : length if max_tokens is None else min(length, max_tokens)].numpy().astype(np.int64))
            if len(found) == count:
                return found
    if not found:
        raise ValidationError("no held-out row of 2 tokens or more without left padding to prompt the decoder with")
    return found


@dataclass
class GenerationReport:
    """What :func:`check_generation` compared (``validation.generation`` in report.json)."""

    onnx_path: str
    passed: bool
    atol: float
    rtol: float
    new_tokens: int
    #: each prompt's ids
    prompt_ids: list[list[int]]
    #: the tokens generated after each prompt (the same on both sides)
    tokens: list[list[int]]
    #: (a) the worst logits difference over the prompts fed whole, in a prefill and one token at a time, against one PyTorch pass
    prefill_max_abs: float
    #: (b) per new token, the worst logits difference over the prompts
    step_max_abs: list[float]
    tokens_identical: bool = True

    @property
    def max_abs(self) -> float:
        return max([self.prefill_max_abs, *self.step_max_abs])

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": self.onnx_path, "passed": self.passed, "atol": self.atol, "rtol": self.rtol,
            "prompts": len(self.prompt_ids), "prompt_tokens": [len(p) for p in self.prompt_ids], "new_tokens": self.new_tokens,
            "tokens_identical": self.tokens_identical, "max_abs_diff": self.max_abs,
            "prefill_max_abs_diff": self.prefill_max_abs, "step_max_abs_diff": self.step_max_abs,
            "prompt_ids": self.prompt_ids, "tokens": self.tokens,
        }


def check_generation(
    onnx_path: str | Path,
    model: Any,
    batches: Iterable[Batch],
    *,
    prompts: int = GENERATION_PROMPTS,
    new_tokens: int = GENERATION_TOKENS,
    max_prompt_tokens: int | None = PROMPT_TOKENS,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    timeout: float | None = None,
) -> GenerationReport:
    """Check that the decoder at ``onnx_path`` generates what ``model`` (a PyTorch
    module called with the decoder's named inputs, returning ``(logits, *present)``,
    run in eval mode) does, from ``prompts`` held-out prompts (:func:`held_out_prompts`
    of ``batches``): (a) and (b) of the module's doc, each logits compared as
    validation compares outputs (``|onnx - torch| <= atol + rtol * |torch|``).
    The first mismatch raises a one-line :class:`ValidationError` that names the
    prompt, the step and the figures. ``timeout``: seconds for the whole check
    (None: no limit); past it onnxruntime (or a tokenizer making held-out text
    batches) is stopped and the check fails."""
    if not (0 <= atol < math.inf and 0 <= rtol < math.inf):
        raise ValidationError(f"tolerances must be non-negative numbers, finite (atol {atol}, rtol {rtol})")
    if timeout is not None and not timeout > 0:
        raise ValidationError(f"timeout must be a positive number of seconds, got {timeout}")
    if prompts < 1 or new_tokens < 1:
        raise ValidationError(f"generation needs 1 prompt and 1 new token at least, got {prompts} and {new_tokens}")
    deadline = time.monotonic() + timeout if timeout is not None and math.isfinite(timeout) else None
    session = onnx_session(onnx_path)
    io = DecoderIO.of(session, onnx_path)
    from ..data.streams import reading_deadline

    def held_up() -> ValidationError:  # held-out text whose tokenizer is still at work
        return ValidationError(f"the generation check of {onnx_path} timed out after {timeout:g} s while the tokenizer made "
                               "the held-out prompts; give a larger `timeout`, or shorter texts")

    with reading_deadline(deadline, held_up):
        chosen = held_out_prompts(batches, prompts, max_prompt_tokens)
    run = _Generation(str(onnx_path), io, onnx_step(session, io, deadline), torch_step(model, io), Tolerance(atol, rtol),
                      timeout, deadline)
    with eval_mode(model):
        tokens = [run.prompt(i, ids, new_tokens) for i, ids in enumerate(chosen)]
    return GenerationReport(str(onnx_path), True, atol, rtol, new_tokens, [p.tolist() for p in chosen], tokens,
                            run.prefill_max_abs, run.step_max_abs)


class _Generation:
    """One :func:`check_generation` under way: the two steps, the tolerance, the worst figures so far."""

    def __init__(self, path: str, io: DecoderIO, onnx: Step, torch_: Step, tolerance: Tolerance,
                 timeout: float | None, deadline: float | None) -> None:
        self.path, self.io, self.onnx, self.torch, self.tolerance = path, io, onnx, torch_, tolerance
        self.timeout, self.deadline = timeout, deadline
        self.prefill_max_abs = 0.0
        self.step_max_abs: list[float] = []

    def prompt(self, index: int, ids: np.ndarray, new_tokens: int) -> list[int]:
        """(a) then (b) for one prompt: the tokens generated."""
        where = f"held-out prompt {index} ({len(ids)} tokens)"
        reference = Decoding(self.torch, self.io)
        want = self.feed(reference, ids[None], f"{where}, one pass")
        got = self.feed(Decoding(self.onnx, self.io), ids[None], f"{where}, one pass")
        self.prefill_max_abs = max(self.prefill_max_abs, self.compare(got, want, f"{where}, one pass"))
        onnx = Decoding(self.onnx, self.io)
        half = max(1, len(ids) // 2)
        got = self.feed(onnx, ids[None, :half], f"{where}, prefill of {half}")
        self.prefill_max_abs = max(self.prefill_max_abs, self.compare(got, want[:, :half], f"{where}, prefill of {half}"))
        for t in range(half, len(ids)):
            at = f"{where}, prompt token {t + 1} fed alone after a prefill of {half}"
            got = self.feed(onnx, ids[None, t : t + 1], at)
            self.prefill_max_abs = max(self.prefill_max_abs, self.compare(got, want[:, t : t + 1], at))
        return self.generate(where, onnx, reference, got[:, -1], want[:, -1], new_tokens)

    def generate(self, where: str, onnx: Decoding, reference: Decoding, got: np.ndarray, want: np.ndarray,
                 new_tokens: int) -> list[int]:
        """(b): greedy steps in lockstep from the prompt's last logits, each side on its own cache."""
        tokens: list[int] = []
        for s in range(new_tokens):
            at = f"{where}, new token {s + 1} of {new_tokens}"
            worst = self.compare(got, want, at)
            if s == len(self.step_max_abs):
                self.step_max_abs.append(0.0)
            self.step_max_abs[s] = max(self.step_max_abs[s], worst)
            mine, theirs = int(np.argmax(got[0])), int(np.argmax(want[0]))
            if mine != theirs:
                raise ValidationError(
                    f"{self.path}: {at}: the tokens differ: ONNX chose {mine}, PyTorch {theirs} "
                    f"(logits max abs diff {worst:.3g}, within tolerance; PyTorch's logits for the two "
                    f"{float(want[0, theirs]):.6g} and {float(want[0, mine]):.6g})"
                )
            tokens.append(mine)
            if s + 1 < new_tokens:
                token = np.array([[mine]])
                got = self.feed(onnx, token, at)[:, -1]
                want = self.feed(reference, token, at)[:, -1]
        return tokens

    def compare(self, got: np.ndarray, want: np.ndarray, where: str) -> float:
        """The max abs difference of ONNX's logits from PyTorch's; over the tolerance, a :class:`ValidationError`."""
        diff = OutputDiff("logits")
        diff.compare(got, want, self.tolerance, where=f"{where}: ")
        if diff.failed:
            raise ValidationError(f"{self.path}: {where}: " + "; ".join(diff.problems(self.tolerance)))
        return diff.max_abs

    def feed(self, decoding: Decoding, tokens: np.ndarray, where: str) -> np.ndarray:
        """``decoding.feed(tokens)``, its failures said as one line that names ``where`` (and the side)."""
        side = "onnxruntime" if decoding.step is self.onnx else "the PyTorch module"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise self.timed_out(where)
        try:
            return decoding.feed(tokens)
        except ValidationError as e:
            raise ValidationError(f"{self.path}: {where}: {side}: {e}") from e
        except TimeoutError as e:
            raise self.timed_out(where) from e
        except Exception as e:  # onnxruntime and the module raise their own exception types
            raise ValidationError(f"{self.path}: {where}: {side} failed: {type(e).__name__}: {first_line(e)}") from e

    def timed_out(self, where: str) -> ValidationError:
        return ValidationError(f"the generation check of {self.path} timed out after {self.timeout:g} s at {where}; "
                               "give a larger `timeout` if the model is only slow")


def _prompt(prompt: Any) -> np.ndarray:
    ids = np.asarray(prompt.detach().cpu() if isinstance(prompt, torch.Tensor) else prompt)
    ids = ids[0] if ids.ndim == 2 and ids.shape[0] == 1 else ids
    if ids.ndim != 1 or ids.size < 1 or ids.dtype.kind not in "iu":
        raise ValidationError(f"a prompt is a 1-D sequence of token ids, got shape {list(ids.shape)} of {ids.dtype}")
    return ids.astype(np.int64)


def _timed(step: Step, io: DecoderIO, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """Seconds of the prompt's pass (which picks the first token), then of ``new_tokens`` greedy steps of one token each."""
    decoding = Decoding(step, io)
    start = time.perf_counter()
    token = int(np.argmax(decoding.feed(prompt[None])[0, -1]))
    prefilled = time.perf_counter()
    for _ in range(new_tokens):
        token = int(np.argmax(decoding.feed(np.array([[token]]))[0, -1]))
    return prefilled - start, time.perf_counter() - prefilled


def decode_latency(dense_path: str | Path, sparse_path: str | Path, prompt: Sequence[int] | np.ndarray | torch.Tensor,
                   **options: Any) -> dict[str, Any]:
    """Decode speed of two decoders with a cache under onnxruntime (batch 1),
    timed alternately as :mod:`~actsparse_deploy.onnx.latency` times passes
    (:func:`decode_latencies`, which takes ``options``: ``new_tokens``, ``threads``,
    ``warmup``, ``runs``): ``dense_*`` / ``sparse_*`` ms per token (the prefill
    excluded), tokens per s and prefill ms, and ``ratio``: sparse / dense ms per
    token (below 1 is faster)."""
    return decode_pair(decode_latencies({"dense": dense_path, "sparse": sparse_path}, prompt, **options), "dense", "sparse")


def decode_pair(timed: Mapping[str, Any], dense: str, sparse: str) -> dict[str, Any]:
    """:func:`decode_latency`'s figures for two of the decoders :func:`decode_latencies` timed (``timed``):
    ``sparse`` against ``dense``, from the same runs (one timing, one set of figures for it)."""
    decoders = timed["decoders"]
    sides = {f"{side}_{key}": value for side, name in (("dense", dense), ("sparse", sparse))
             for key, value in decoders[name].items() if key != "ratio"}
    return {**sides, "ratio": sides["sparse_ms_per_token"] / sides["dense_ms_per_token"],
            **{key: value for key, value in timed.items() if key != "decoders"}}


def decode_latencies(
    paths: Mapping[str, str | Path],
    prompt: Sequence[int] | np.ndarray | torch.Tensor,
    new_tokens: int = DECODE_TOKENS,
    *,
    threads: int | None = None,
    warmup: int = DECODE_WARMUP,
    runs: int = DECODE_RUNS,
) -> dict[str, Any]:
    """Decode speed of decoders with a cache under onnxruntime (batch 1), each
    ``paths`` entry timed alternately as :mod:`~actsparse_deploy.onnx.latency`
    times passes. One run is a greedy generation: the prompt's pass (the prefill,
    which picks the first token), then ``new_tokens`` steps of one token each. Per
    decoder (``decoders``, in order): ``ms_per_token``, the median over ``runs``
    (after ``warmup``) of those steps' time / ``new_tokens``, **the prefill
    excluded** and reported apart (``prefill_ms``, its median), ``tokens_per_s``,
    and ``ratio`` to the first decoder's ms per token. ``threads``: None for the
    command's. No decoder stops at an end-of-sequence token: all run the same steps."""
    from ..base.threads import check_threads, current_threads

    ids = _prompt(prompt)
    if new_tokens < 1:
        raise ValidationError(f"decode latency needs 1 new token at least, got {new_tokens}")
    threads = current_threads() if threads is None else check_threads(threads)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    with torch_threads(threads):
        def variant(name: str, path: str | Path) -> Callable[[], Callable[[], None]]:
            def open_() -> Callable[[], None]:
                session = ort_session(path, threads)
                io = DecoderIO.of(session, path)
                step = onnx_step(session, io, interruptible=False)
                return lambda: times[name].append(_timed(step, io, ids, new_tokens))
            return open_

        time_variants({name: variant(name, path) for name, path in paths.items()}, warmup, runs)
    decoders: dict[str, dict[str, float]] = {}
    for name, measured in times.items():
        timed = measured[-runs:]  # the warm-up rounds came first
        per_token = statistics.median(d for _, d in timed) / new_tokens * 1e3
        decoders[name] = {"ms_per_token": per_token, "tokens_per_s": 1e3 / per_token,
                          "prefill_ms": statistics.median(p for p, _ in timed) * 1e3}
    first = next(iter(decoders.values()))["ms_per_token"]
    for figures in decoders.values():
        figures["ratio"] = figures["ms_per_token"] / first
    return {"decoders": decoders, "prompt_tokens": int(ids.size), "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
            "threads": threads}
