"""Hugging Face models from a local directory, and text made into their batches.

A model argument that is a directory holding a ``config.json`` (or ``hf:PATH``)
is a Hugging Face model saved with ``save_pretrained``. It is loaded offline
(``local_files_only``, nothing is downloaded) with the ``transformers`` Auto
class of its task, from ``.safetensors`` weights only (a pickle ``.bin`` could
run code: refused), with ``use_cache=False`` and eager attention, and wrapped in
an :class:`HFModel`: named tensors in (``input_ids``, ``attention_mask``, and
``token_type_ids`` where the model takes them), a dict of named tensors out
(``logits``, ``last_hidden_state``, ``sentence_embedding``), never a
``ModelOutput`` or a cache. Its tokenizer turns a text file (one text per line,
or ``.jsonl`` with a ``text`` field) into dict batches, padded per batch to the
longest text.

    >>> from actsparse_deploy.hf import TASKS, task_of_class
    >>> TASKS
    ('feature-extraction', 'sentence-embedding', 'causal-lm', 'sequence-classification')
    >>> task_of_class("LlamaForCausalLM"), task_of_class("GPT2LMHeadModel"), task_of_class("BertModel")
    ('causal-lm', 'causal-lm', 'feature-extraction')
    >>> task_of_class("BertForMaskedLM") is None
    True

Loading one (``tiny-llama/`` written by ``model.save_pretrained`` and
``tokenizer.save_pretrained``):

    source = load_hf("tiny-llama", task="causal-lm")
    batches = source.text_batches("calib.txt", batch_size=8)
    source.model(**batches[0])["logits"].shape     # (8, longest, vocab)
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .batches import Batch
from .constants import HF_TASKS, hub_offline
from .errors import DataError, ModelLoadError, WeightsError, first_line

hub_offline()  # before transformers is first imported

__all__ = [
    "HF_PREFIX",
    "SEQUENCE_AXES",
    "TASKS",
    "HFModel",
    "HFSource",
    "hf_directory",
    "default_recipe",
    "load_hf",
    "read_texts",
    "task_of_class",
    "wrap_pretrained",
]

#: what ``--task`` takes (optimum-cli's names)
TASKS = HF_TASKS
#: a model argument that starts with this is a Hugging Face directory, whatever else it looks like
HF_PREFIX = "hf:"
#: the dynamic axes of token inputs and per-token outputs
SEQUENCE_AXES: Mapping[int, str] = {0: "batch", 1: "sequence"}
#: the output each task returns, and whether it has a sequence axis
_OUTPUTS: dict[str, tuple[str, bool]] = {
    "feature-extraction": ("last_hidden_state", True),
    "sentence-embedding": ("sentence_embedding", False),
    "causal-lm": ("logits", True),
    "sequence-classification": ("logits", False),
}
#: the longest text without --max-length when the config names no limit
DEFAULT_MAX_LENGTH = 512
#: weight files that are pickles (could run code when read)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _tasks() -> str:
    return ", ".join(TASKS)


def check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ModelLoadError(f"unknown `task` {task!r}; known: {_tasks()}")


def hf_directory(spec: str) -> Path | None:
    """The Hugging Face model directory ``spec`` names (``hf:PATH``, or a
    directory), None where it names no directory. A directory without
    ``config.json`` is refused."""
    explicit = spec.startswith(HF_PREFIX)
    path = Path(spec[len(HF_PREFIX):] if explicit else spec).expanduser()
    if not explicit and not path.is_dir():
        return None
    if not path.is_dir():
        raise ModelLoadError(f"Hugging Face model directory {path} does not exist ({spec!r})")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is a directory without config.json: not a Hugging Face model directory "
            "(save one with model.save_pretrained(DIR))"
        )
    return path


def task_of_class(name: str) -> str | None:
    """The task a ``transformers`` model class name implies; None where it implies none of :data:`TASKS`."""
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if name.endswith("Model") and "For" not in name:
        return "feature-extraction"
    return None


def _infer_task(architectures: Sequence[str], where: str) -> str:
    tasks = {task_of_class(a) for a in architectures}
    if len(tasks) == 1 and None not in tasks:
        return tasks.pop()  # type: ignore[return-value]
    found = ", ".join(architectures) if architectures else "none"
    raise ModelLoadError(f"cannot tell the task of {where} from its architectures ({found}): pass `task`, one of {_tasks()}")


def _check_weights(directory: Path) -> None:
    """Safetensors weights only: pickles are refused before transformers sees them."""
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{directory} holds its weights as pickle files ({', '.join(pickles[:3])}), which are refused: unpickling can "
            "run code. Save them as .safetensors: model.save_pretrained(DIR, safe_serialization=True)"
        )
    raise WeightsError(f"{directory} holds no .safetensors weights (model.safetensors): save them with model.save_pretrained(DIR)")


def _auto_class(task: str) -> Any:
    import transformers

    if task == "causal-lm":
        return transformers.AutoModelForCausalLM
    if task == "sequence-classification":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModel


class HFModel(nn.Module):
    """A ``transformers`` model called with named tensors, returning a dict of
    named tensors: ``logits`` (causal LM: per token; sequence classification:
    per text), ``last_hidden_state`` (feature extraction) or
    ``sentence_embedding`` (the attention-masked mean of the last hidden
    state, L2-normalised). Per-token outputs are zero at padding positions
    (they carry no meaning). A missing ``attention_mask`` is all ones.

    Not built directly: :func:`wrap_pretrained` makes the model an instance of
    a subclass of its own class and this one, so that its modules keep their
    Hugging Face names (``model.layers.0.mlp.down_proj``) and its weights their keys."""

    actsparse_task: str

    @property
    def task(self) -> str:
        return self.actsparse_task

    @property
    def output_name(self) -> str:
        return _OUTPUTS[self.actsparse_task][0]

    @property
    def per_token(self) -> bool:
        return _OUTPUTS[self.actsparse_task][1]

    def input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self._run(input_ids, attention_mask, {})

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, extra: dict[str, Any]) -> dict[str, torch.Tensor]:
        if attention_mask is None:  # explicit: transformers' own guess traces to ops the exporters lack
            attention_mask = torch.ones_like(input_ids)
        hf_forward = super().forward  # the Hugging Face class's own (HFModel is mixed in before it)
        out = hf_forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True, **extra)
        keep = attention_mask.unsqueeze(-1)
        if self.task in ("feature-extraction", "sentence-embedding"):
            hidden = out.last_hidden_state
            masked = hidden * keep.to(hidden.dtype)
            if self.task == "feature-extraction":
                return {"last_hidden_state": masked}
            weights = keep.to(hidden.dtype)
            mean = masked.sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return {"sentence_embedding": mean / mean.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)}
        logits = out.logits
        if self.per_token:
            logits = logits * keep.to(logits.dtype)
        return {"logits": logits}


class HFModelWithTokenTypes(HFModel):
    """An :class:`HFModel` whose model also takes ``token_type_ids`` (BERT and its kin)."""

    def input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask", "token_type_ids")

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self._run(input_ids, attention_mask, extra)


_WRAPPED: dict[tuple[type, type], type] = {}


def wrap_pretrained(model: nn.Module, task: str | None = None, where: str = "the model") -> HFModel:
    """``model`` (a ``transformers`` ``PreTrainedModel``) made an :class:`HFModel`
    in place: ``task`` else the one its class implies, caching off, eval mode."""
    check_task(task)
    if isinstance(model, HFModel):
        if task is not None and task != model.task:
            model.actsparse_task = task
        return model
    the_task = task or _infer_task([type(model).__name__], where)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    mixin = HFModelWithTokenTypes if takes_types else HFModel
    base = type(model)
    if (mixin, base) not in _WRAPPED:
        _WRAPPED[(mixin, base)] = type(base.__name__, (mixin, base), {"__module__": __name__, "__doc__": mixin.__doc__})
    model.__class__ = _WRAPPED[(mixin, base)]
    model.actsparse_task = the_task  # type: ignore[assignment]
    return model.eval()  # type: ignore[return-value]


#: the MLP output projections of common families (their input is the MLP's hidden activation):
#: Llama / Mistral / Qwen (``down_proj``), GPT-2 (``c_proj``), OPT-style ``fc2``, BERT (``layer.N.output.dense``)
MLP_DOWN_PATTERNS = ("*.mlp.down_proj", "*.mlp.c_proj", "*.mlp.fc2", "*.layer.[0-9].output.dense", "*.layer.[0-9][0-9].output.dense")
#: the default recipe's level
DEFAULT_SPARSITY = 0.5


#: the most memory the default recipe's Gram statistics may take (float64, ``(d + 1)^2`` per layer)
DEFAULT_GRAM_BYTES = 2 << 30


def default_recipe(model: nn.Module) -> Any:
    """The recipe of a Hugging Face model given none: a structured mask (one value
    per feature, so it prunes) on the input of each MLP output projection, at
    :data:`DEFAULT_SPARSITY`, selected by ``obs`` and compensated by ``lstsq`` as
    the built-in recipes are (the tool's default method); where those layers'
    Gram statistics would take more than :data:`DEFAULT_GRAM_BYTES`, the features
    with the least summed absolute activation instead. None where no module
    matches :data:`MLP_DOWN_PATTERNS`."""
    from fnmatch import fnmatchcase

    from .layers import WeightedKind, layer_kind
    from .recipe import Recipe

    matched = [(name, module) for name, module in model.named_modules() if any(fnmatchcase(name, p) for p in MLP_DOWN_PATTERNS)]
    if not matched:
        return None
    patterns = [p for p in MLP_DOWN_PATTERNS if any(fnmatchcase(name, p) for name, _ in matched)]
    widths = [kind.in_features(module) if isinstance(kind := layer_kind(module), WeightedKind) else None for _, module in matched]
    recipe = Recipe.simple(patterns, None, DEFAULT_SPARSITY, None, "sum_abs", structured=True)
    if all(w is not None for w in widths) and sum(8 * (w + 1) ** 2 for w in widths if w is not None) <= DEFAULT_GRAM_BYTES:
        return recipe.with_method("obs", "lstsq")
    return recipe


def is_pretrained(module: Any) -> bool:
    """A ``transformers`` model (checked without importing transformers)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(module).__mro__)


# --- text ------------------------------------------------------------------------


def read_texts(path: str | Path) -> list[str]:
    """The texts of a file: one per line, or a ``.jsonl`` file's ``text`` fields; blank ones skipped."""
    from .streams import text_lines

    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    texts = list(text_lines(path))
    if not texts:
        raise DataError(f"text file {path} holds no text (every line is blank)")
    return texts


@dataclass
class HFSource:
    """A loaded Hugging Face directory: the wrapped ``model``, its ``task`` and
    ``directory`` (where the tokenizer is read from, when text is given)."""

    model: HFModel
    directory: Path | None
    max_length: int | None = None
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def config(self) -> Any:
        return self.model.config

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.directory is None:
                raise DataError("`text` needs a tokenizer: a model from a factory has none; pass token ids as `data`")
            from transformers import AutoTokenizer

            _refuse_custom_code(self.directory / "tokenizer_config.json", DataError, "tokenizer")
            try:
                with _transformers_quiet():
                    self._tokenizer = AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True, trust_remote_code=False)
            except Exception as e:  # the tokenizers library raises plain Exception for a malformed tokenizer.json
                raise DataError(
                    f"{self.directory} has no tokenizer that loads (tokenizer.json / tokenizer_config.json: "
                    f"{type(e).__name__}: {first_line(e)}): `text` needs one; save it there with "
                    "tokenizer.save_pretrained(DIR), or pass token ids as `data`"
                ) from e
        return self._tokenizer

    def _limit(self) -> int:
        if self.max_length is not None:
            return self.max_length
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return DEFAULT_MAX_LENGTH

    def text_batches(self, path: str | Path, batch_size: int) -> list[Batch]:
        """The texts of ``path``, tokenized (truncated to the maximum length),
        in dict batches padded (right) to each batch's longest text: a
        :class:`~actsparse_deploy.streams.TextStream` read whole (the commands stream it)."""
        from .streams import TextStream

        return list(TextStream(self, path, batch_size))

    def sample_batch(self, length: int = 8) -> Batch:
        """Token ids to look at the layers with when no data is given (ids 1..length)."""
        vocab = int(getattr(self.config, "vocab_size", length + 1) or length + 1)
        input_ids = (torch.arange(1, length + 1, dtype=torch.int64) % vocab).unsqueeze(0)
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if "token_type_ids" in self.model.input_names():
            batch["token_type_ids"] = torch.zeros_like(input_ids)
        return batch

    def io_names(self, example: Batch | None) -> tuple[tuple[str, ...], dict[str, dict[int, str]]]:
        """Input and output names and dynamic axes for batches like ``example``."""
        if isinstance(example, Mapping):
            inputs = tuple(example)
        elif isinstance(example, (tuple, list)):
            inputs = self.model.input_names()[:len(example)]
        elif isinstance(example, torch.Tensor):
            inputs = ("input_ids",)
        else:
            inputs = ("input_ids", "attention_mask")
        output = self.model.output_name
        axes = {name: dict(SEQUENCE_AXES) for name in inputs}
        axes[output] = dict(SEQUENCE_AXES) if self.model.per_token else {0: "batch"}
        return inputs, axes


def _refuse_custom_code(path: Path, error: type[Exception], what: str) -> None:
    """A directory whose ``config.json`` / ``tokenizer_config.json`` names its own
    code (``auto_map``) would have transformers import it: refused before any load."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise error(f"{path} is not readable JSON ({type(e).__name__}: {first_line(e)})") from e
    if not isinstance(data, dict):
        raise error(f"{path} holds a {type(data).__name__}, not a JSON object")
    if "auto_map" in data:
        raise error(
            f"{path} names its own code (auto_map): loading this {what} would run the directory's Python files; "
            "this tool loads only models and tokenizers transformers defines"
        )


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' load report and warnings are errors or nothing: one line is ours to print."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_hf(directory: str | Path, task: str | None = None, max_length: int | None = None) -> HFSource:
    """The model saved in ``directory``, for ``task`` (default: the one its
    ``config.json`` architectures imply), wrapped as an :class:`HFModel`."""
    check_task(task)
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{directory / 'config.json'} is not readable JSON ({type(e).__name__}: {first_line(e)})") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{directory / 'config.json'} holds a {type(config).__name__}, not a JSON object")
    _refuse_custom_code(directory / "config.json", ModelLoadError, "model")
    architectures = config.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    the_task = task or _infer_task([str(a) for a in architectures], str(directory))
    _check_weights(directory)
    try:
        auto = _auto_class(the_task)
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise ModelLoadError(f"a Hugging Face model directory needs transformers: {e}") from e
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on the user's terminal
    try:
        with _transformers_quiet():
            model, info = auto.from_pretrained(
                str(directory), local_files_only=True, use_safetensors=True, attn_implementation="eager", output_loading_info=True,
                trust_remote_code=False, ignore_mismatched_sizes=True,
            )
    except Exception as e:  # transformers raises many types; a weights file it cannot read is the weights' fault
        kind = type(e).__name__
        if kind == "SafetensorError" or "safetensors" in str(e).lower() or "no file named" in str(e):
            raise WeightsError(f"the weights in {directory} cannot be read ({kind}: {first_line(e)}): save them again with "
                               "model.save_pretrained(DIR)") from e
        raise ModelLoadError(f"cannot load {directory} as a {the_task} model ({auto.__name__}): {kind}: {first_line(e)}") from e
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(k[0]) if isinstance(k, (tuple, list)) else str(k) for k in info.get("mismatched_keys") or []]
    if missing or mismatched:
        few = ", ".join((missing + mismatched)[:4]) + (" ..." if len(missing) + len(mismatched) > 4 else "")
        raise WeightsError(
            f"the weights in {directory} do not fill a {type(model).__name__} for task {the_task} (missing or wrong: {few}): "
            f"those would be random; pass the `task` the model was saved for ({', '.join(architectures) or 'see config.json'})"
        )
    return HFSource(wrap_pretrained(model.eval(), the_task, str(directory)), directory, max_length)
