"""Decoders with a KV cache: a causal language model as the serving stack runs it.

A causal LM exported for one full pass re-reads the whole sequence for every new
token. :class:`WithPast` is the model with its cache as tensors in and out, the
names and layout of Optimum's ``text-generation-with-past`` export (what
``ORTModelForCausalLM`` and onnxruntime's generate loop feed):

- in: ``input_ids``, ``attention_mask`` (past and new tokens), ``position_ids``,
  ``past_key_values.{i}.key`` / ``.value`` ``(batch, kv heads, past length, head dim)``;
- out: ``logits``, ``present.{i}.key`` / ``.value`` (the past and the new tokens).

Batch, sequence and past length are dynamic; a past of length 0 is the first
step. The cache is built inside the graph from those tensors (a plain
``DynamicCache``: every layer keeps its whole past, the model applies any
sliding window itself), so no model code changes.

What export, validation and latency run is a :class:`Target` (:func:`export_target`
decides it once the workload loads): a causal language model (a Hugging Face
``causal-lm`` or tiny-lm) as its decoder with a cache unless the user says
``cache=False`` (``--no-cache``), any other model as it is. It turns the
workload's pieces into the decoder's: the model (the squashed or the dense one)
wrapped, the export example (tokens after a short random past), the I/O spec
(Optimum's names) and the held-out batches (each a first step: an empty cache).

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from actsparse_deploy.models.decoder import CacheLayout, WithPast, decoder_batch
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                   num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> layout = CacheLayout.of(lm)
    >>> layout
    CacheLayout(layers=2, kv_heads=2, head_dim=8)
    >>> batch = decoder_batch({"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}, layout)
    >>> out = WithPast(lm)(**batch)
    >>> [tuple(t.shape) for t in out[:3]]
    [(1, 3, 64), (1, 2, 3, 8), (1, 2, 3, 8)]
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, overload

import torch
from torch import nn

from ..base.constants import DEFAULT_ATOL, DEFAULT_RTOL, HALF_ATOL, HALF_RTOL
from ..base.errors import ExportError, UsageError
from ..base.threads import half_arithmetic
from ..data.batches import Batch, Stream
from ..data.iospec import IOSpec
from ..data.workload import Workload
from ..nn.modules import float_dtype
from .hf import HFModel

__all__ = ["CacheLayout", "Target", "WithPast", "causal_lm", "decoder_batch", "decoder_example", "export_dtype", "export_target", "position_ids"]

#: the inputs before the cache's
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
#: dynamic axis labels: Optimum's (the mask's, an identifier here: torch.export names a dimension by it)
BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
#: the present's length axis, as Optimum names it
PRESENT = "past_sequence_length + sequence_length"


def _config_int(config: Any, *keys: str) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class CacheLayout:
    """The shape of a decoder's cache: per layer one key and one value tensor
    ``(batch, kv_heads, past, head_dim)``."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, lm: nn.Module) -> CacheLayout:
        """Read from a ``transformers`` causal LM's config (Llama-style names, GPT-2's ``n_layer`` / ``n_head``)."""
        config = getattr(lm, "config", None)
        layers = _config_int(config, "num_hidden_layers", "n_layer")
        heads = _config_int(config, "num_attention_heads", "n_head")
        hidden = _config_int(config, "hidden_size", "n_embd")
        if layers is None or heads is None or hidden is None:
            raise ExportError(
                f"{type(lm).__name__}: its config does not say its layers, heads and hidden size: the cache cannot be laid out; "
                "try --no-cache"
            )
        kv_heads = _config_int(config, "num_key_value_heads") or heads
        head_dim = _config_int(config, "head_dim") or hidden // heads
        return cls(layers, kv_heads, head_dim)

    @classmethod
    def declared(cls, shapes: Mapping[str, Sequence[int | None]]) -> CacheLayout | None:
        """Read from a model's declared inputs (name -> dims, None where not fixed): its
        ``past_key_values.{i}.key`` / ``.value``, each ``(batch, kv_heads, past, head_dim)``; None where it takes none
        or they do not say their heads and head size.

        >>> CacheLayout.declared({"input_ids": [None, None], **{f"past_key_values.{i}.{kv}": [None, 2, None, 8]
        ...                       for i in range(3) for kv in ("key", "value")}})
        CacheLayout(layers=3, kv_heads=2, head_dim=8)
        """
        past = [dims for name, dims in shapes.items() if name.startswith("past_key_values.")]
        if not past or len(past[0]) != 4 or past[0][1] is None or past[0][3] is None:
            return None
        layout = cls(len(past) // 2, past[0][1], past[0][3])
        return layout if set(layout.past_names()) == {name for name in shapes if name.startswith("past_key_values.")} else None

    def past_names(self) -> tuple[str, ...]:
        return tuple(f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value"))

    def present_names(self) -> tuple[str, ...]:
        return tuple(f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value"))

    def io_spec(self) -> IOSpec:
        """Names and dynamic axes of the exported decoder (Optimum's)."""
        axes: dict[str, dict[int, str]] = {
            "input_ids": {0: BATCH, 1: SEQUENCE}, "attention_mask": {0: BATCH, 1: TOTAL}, "position_ids": {0: BATCH, 1: SEQUENCE},
            "logits": {0: BATCH, 1: SEQUENCE},
        }
        axes.update({name: {0: BATCH, 2: PAST} for name in self.past_names()})
        axes.update({name: {0: BATCH, 2: PRESENT} for name in self.present_names()})
        return IOSpec((*STEP_INPUTS, *self.past_names()), ("logits", *self.present_names()), axes)

    def first_step_spec(self) -> IOSpec:
        """:meth:`io_spec` as first steps use it, for validation (which re-cuts batches along the axes
        that share a label, and runs a second length of each): the mask as long as the tokens, the
        cache empty (its length is checked by the generation check, step by step)."""
        spec = self.io_spec()
        axes = {name: dict(per) for name, per in spec.dynamic_axes.items()}
        axes["attention_mask"][1] = SEQUENCE
        for name in (*self.past_names(), *self.present_names()):
            axes[name].pop(2)
        return IOSpec(spec.input_names, spec.output_names, axes)

    def empty_past(self, batch: int, dtype: torch.dtype = torch.float32, length: int = 0,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The cache inputs for a first step (``length`` 0), or random ones of ``length`` (an export example)."""
        shape = (batch, self.kv_heads, length, self.head_dim)
        return {name: torch.randn(shape, dtype=dtype, generator=generator) if length else torch.zeros(shape, dtype=dtype)
                for name in self.past_names()}


def causal_lm(model: nn.Module) -> nn.Module | None:
    """The ``transformers`` causal LM a workload's model runs: a Hugging Face
    model wrapped for ``causal-lm``, or a module that holds one as ``lm``
    (tiny-lm); None for anything else."""
    if isinstance(model, HFModel):
        return model if model.task == "causal-lm" else None
    inner = getattr(model, "lm", None)
    if isinstance(inner, nn.Module) and type(inner).__name__.endswith("ForCausalLM"):
        return inner
    return None


def _hf_forward(lm: nn.Module) -> Any:
    """The Hugging Face class's own forward (an :class:`HFModel` overrides it with one pass, no cache)."""
    return super(HFModel, lm).forward if isinstance(lm, HFModel) else lm.forward  # type: ignore[arg-type]


class WithPast(nn.Module):
    """A ``transformers`` causal LM with its cache as tensors in and out (see the module's doc)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.layout = CacheLayout.of(lm)
        parameters = inspect.signature(_hf_forward(lm)).parameters
        #: transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns)
        self.cache_keyword = "cache" if "cache" in parameters else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                **past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()  # no config: a sliding-window layer would crop what it returns
        names, layout = self.layout.past_names(), self.layout
        for i in range(layout.layers):
            key, value = past[names[2 * i]], past[names[2 * i + 1]]
            if key.shape[1] != layout.kv_heads and key.shape[2] == 0:  # an empty cache laid out for another model (the dense one)
                key = value = key.new_zeros((key.shape[0], layout.kv_heads, 0, layout.head_dim))
            cache.update(key, value, i)
        out = _hf_forward(self.lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=True, return_dict=True, **{self.cache_keyword: cache})
        present = getattr(out, self.cache_keyword, None) or out.past_key_values
        return (out.logits, *[t for layer in present.layers for t in (layer.keys, layer.values)])


def position_ids(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The positions of the last ``length`` tokens: each token's index among the
    unmasked ones (padding 1), as transformers' generate loop makes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)[:, -length:]


def _ids_and_mask(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping) and "input_ids" in batch:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
    else:
        ids = batch if isinstance(batch, torch.Tensor) else batch[0]  # type: ignore[index]
        mask = None
    return ids, mask if mask is not None else torch.ones_like(ids)


def decoder_batch(batch: Batch, layout: CacheLayout, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A token batch as the decoder's first step: its ids and mask, their positions, an empty cache."""
    ids, mask = _ids_and_mask(batch)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask, ids.shape[1]),
            **layout.empty_past(ids.shape[0], dtype)}


def decoder_example(batch: Batch, layout: CacheLayout, dtype: torch.dtype = torch.float32, past: int = 3) -> dict[str, torch.Tensor]:
    """What the exporter traces the decoder with: ``batch``'s tokens after a
    random cache of ``past`` positions (a length of 0 or 1 would be taken as fixed)."""
    ids, mask = _ids_and_mask(batch)
    full = torch.cat([torch.ones(ids.shape[0], past, dtype=mask.dtype), mask], dim=1)
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": ids, "attention_mask": full, "position_ids": position_ids(full, ids.shape[1]),
            **layout.empty_past(ids.shape[0], dtype, past, generator)}


@dataclass(frozen=True)
class Target:
    """How a workload's model is exported: as it is (``layout`` None), or as its decoder with a cache of ``layout``;
    its weights (and floating inputs, the cache too) in ``dtype``, from weights stored in ``source``."""

    layout: CacheLayout | None = None
    dtype: torch.dtype = torch.float32
    source: torch.dtype = torch.float32

    def precision(self) -> dict[str, str]:
        """The report's ``export.dtype`` (the weights written) and ``export.source_dtype`` (as they were stored)."""
        return {"dtype": _name(self.dtype), "source_dtype": _name(self.source)}

    def tolerances(self, atol: float, rtol: float) -> tuple[float, float]:
        """The tolerances validation holds the export to: ``atol`` and ``rtol``, or a float16 export's where they
        are float32's defaults (float16 keeps about three significant digits: ``HALF_ATOL``, ``HALF_RTOL``)."""
        if self.dtype == torch.float16 and (atol, rtol) == (DEFAULT_ATOL, DEFAULT_RTOL):
            return HALF_ATOL, HALF_RTOL
        return atol, rtol

    def dtype_note(self, atol: float, rtol: float) -> str | None:
        """What the report says where the export's dtype is not the source's (validated at ``atol`` / ``rtol``)."""
        if self.dtype == self.source:
            return None
        written, stored = _name(self.dtype), _name(self.source)
        why = "onnxruntime runs no bfloat16 MatMul on CPU" if self.source == torch.bfloat16 and written == "float16" else f"--dtype {written}"
        checked = f"; validated at atol {atol:g}, rtol {rtol:g}, as float16 allows" if self.dtype == torch.float16 else ""
        slow = ("; this CPU has no float16 arithmetic (AVX512-FP16 / AMX): onnxruntime runs float16 slower than float32 here "
                "(--dtype float32: faster, twice the size)") if self.dtype == torch.float16 and half_arithmetic() is False else ""
        return f"the weights were {stored}: the model was calibrated, pruned and written in {written} ({why}){checked}{slow}"

    @property
    def cached(self) -> bool:
        return self.layout is not None

    def cast(self, work: Workload) -> bool:
        """``work``'s model cast in place to the dtype this target writes, where its weights are in another;
        whether it was."""
        if self.dtype == self.source:
            return False
        work.cast(self.dtype)
        return True

    def of_model(self, model: nn.Module) -> Target:
        """This target for ``model`` (the dense or the squashed one): a decoder's cache laid out as its config
        says now (a decoder whose attention heads were pruned has fewer key/value heads)."""
        if self.layout is None:
            return self
        lm = causal_lm(model)
        assert lm is not None  # export_target checked the dense one, squash keeps its class
        return replace(self, layout=CacheLayout.of(lm))

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` (the dense or the squashed one) as it is exported."""
        if self.layout is None:
            return model
        lm = causal_lm(model)
        assert lm is not None  # export_target checked the dense one, squash keeps its class
        return WithPast(lm).eval()

    def example(self, work: Workload) -> Batch:
        return work.example() if self.layout is None else decoder_example(work.example(), self.layout, self.dtype)

    def io(self, work: Workload) -> IOSpec | None:
        return work.io if self.layout is None else self.layout.io_spec()

    def batches(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        """Held-out batches as the exported model takes them (a decoder's: first steps, an empty cache)."""
        layout = self.layout
        if layout is None:
            return batches
        if isinstance(batches, Stream):
            return batches.map(lambda b: decoder_batch(b, layout, self.dtype))
        return [decoder_batch(b, layout, self.dtype) for b in batches]

    @overload
    def validation_io(self, exported: IOSpec) -> IOSpec: ...
    @overload
    def validation_io(self, exported: IOSpec | None) -> IOSpec | None: ...
    def validation_io(self, exported: IOSpec | None) -> IOSpec | None:
        """The I/O spec validation and the cost's ONNX pass use on :meth:`batches` (a decoder's first steps;
        else ``exported``, the spec the model was exported with, None where unknown)."""
        return exported if self.layout is None else self.layout.first_step_spec()

    def exporter(self, asked: str) -> str:
        """The exporter a decoder with a cache needs (dynamo: the cache's tensors are traced through ``DynamicCache``)."""
        if self.layout is None:
            return asked
        if asked in ("dynamo", "auto"):
            return "dynamo"
        raise ExportError(f"a decoder with a KV cache exports with the dynamo exporter only, not {asked}: "
                          "pass --exporter dynamo, or --no-cache for one full pass per call")


def export_dtype(asked: str, source: torch.dtype) -> torch.dtype:
    """The dtype an export asked for as ``asked`` writes (``auto``: float16 for half-precision
    weights, bfloat16 or float16, which onnxruntime runs on CPU as float16 only; else the source's).

    >>> export_dtype("auto", torch.bfloat16), export_dtype("auto", torch.float32), export_dtype("float16", torch.float32)
    (torch.float16, torch.float32, torch.float16)
    """
    if asked == "auto":
        return torch.float16 if source in (torch.bfloat16, torch.float16) else source
    return {"float32": torch.float32, "float16": torch.float16}[asked]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_target(work: Workload, cache: bool | None, exporter: str | None = None, dtype: str = "auto") -> Target:
    """The workload's :class:`Target`: a causal language model with a cache unless
    ``cache`` is False; ``cache=True`` for any other model is a :class:`UsageError`,
    an ``exporter`` the target cannot be exported with an :class:`ExportError`; the weights
    in the dtype ``dtype`` asks for (:func:`export_dtype`) from the one they are stored in."""
    source = float_dtype(work.model)
    precision = {"dtype": export_dtype(dtype, source), "source": source}
    lm = causal_lm(work.model) if work.causal_lm and cache is not False else None
    if lm is None:
        if cache:
            raise UsageError(f"--cache is for causal language models (Hugging Face causal-lm, tiny-lm); {work.name!r} is not one")
        return Target(**precision)
    target = Target(CacheLayout.of(lm), **precision)
    if exporter is not None:
        target.exporter(exporter)
    return target
