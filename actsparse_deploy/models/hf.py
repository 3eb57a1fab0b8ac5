"""Hugging Face models from a local directory, and text made into their batches.

A model argument that is a directory holding a ``config.json`` (or ``hf:PATH``)
is a Hugging Face model saved with ``save_pretrained``. It is loaded offline
(``local_files_only``, nothing is downloaded) with the ``transformers`` Auto
class of its task, from ``.safetensors`` weights only (a pickle ``.bin`` could
run code: refused unread, even where an index names it), after its config.json's
sizes are checked against the weights' headers on a model built on the meta
device, with ``use_cache=False`` and eager attention, and wrapped in
an :class:`HFModel`: named tensors in (``input_ids``, ``attention_mask``, and
``token_type_ids`` where the model takes them), a dict of named tensors out
(``logits``, ``last_hidden_state``, and ``sentence_embedding`` after it), never a
``ModelOutput`` or a cache. Its tokenizer turns a text file (one text per line,
or ``.jsonl`` with a ``text`` field) into dict batches, padded per batch to the
longest text.

    >>> from actsparse_deploy.models.hf import TASKS, task_of_class
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

import atexit
import contextlib
import inspect
import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.constants import HF_TASKS, hub_offline
from ..base.errors import ActsparseError, DataError, MemoryBudgetError, ModelLoadError, UsageError, WeightsError, first_line, is_panic
from ..data.batches import Batch

hub_offline()  # before transformers is first imported

__all__ = [
    "HF_PREFIX",
    "SEQUENCE_AXES",
    "TASKS",
    "HFModel",
    "HFSource",
    "check_config_fits",
    "default_recipe",
    "hf_directory",
    "load_hf",
    "read_json_object",
    "read_texts",
    "task_of_class",
    "weight_files",
    "wrap_pretrained",
]

#: what ``--task`` takes (optimum-cli's names)
TASKS = HF_TASKS
#: a model argument that starts with this is a Hugging Face directory, whatever else it looks like
HF_PREFIX = "hf:"
#: the dynamic axes of token inputs and per-token outputs
SEQUENCE_AXES: Mapping[int, str] = {0: "batch", 1: "sequence"}
#: the outputs each task returns, in order, and whether each has a sequence axis: a sentence embedding comes after
#: the last hidden state it pools (what feature-extraction loaders such as Optimum's and sentence-transformers' read)
_OUTPUTS: dict[str, tuple[tuple[str, bool], ...]] = {
    "feature-extraction": (("last_hidden_state", True),),
    "sentence-embedding": (("last_hidden_state", True), ("sentence_embedding", False)),
    "causal-lm": (("logits", True),),
    "sequence-classification": (("logits", False),),
}
#: the longest text without --max-length when the config names no limit
DEFAULT_MAX_LENGTH = 512
#: weight files that are pickles (could run code when read)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: the weights transformers reads from a directory (``use_safetensors``): one file, else the shards its index names
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
#: modules a model may have per tensor of its weights (most hold one or two, activations and dropouts none): a
#: config.json whose model has more, built on the meta device, is stopped there (its weights could not fill it)
MODULES_PER_TENSOR = 16
#: a model built from config.json may have this many times its weights' parameters (plus SLACK_PARAMETERS) before it
#: is refused unbuilt: a head the weights lack (a task they were not saved for) is named after loading instead
PARAMETERS_PER_WEIGHT, SLACK_PARAMETERS = 2, 1 << 20
#: config.json fields that are sizes or counts (never negative)
_SIZE_FIELD = re.compile(r"^(num|n)_\w+$|^\w+_(size|dim|layers|heads|embeddings)$")


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


def read_json_object(path: Path, error: type[ActsparseError]) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` naming the file where it is unreadable, not JSON, nested too deep
    for the parser, or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError as e:
        raise error(f"{path} is nested too deep to read (arrays or objects inside each other thousands of levels deep)") from e
    except (OSError, ValueError) as e:
        raise error(f"{path} is not readable JSON ({type(e).__name__}: {first_line(e)})") from e
    if not isinstance(data, dict):
        raise error(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def _architectures(config: dict[str, Any], path: Path) -> list[str]:
    """config.json's ``architectures`` (a list of class names, or one name); its other fields that must be a
    string (``model_type``) or a non-negative size are checked too: the model's code would fail on them in its own way."""
    architectures = config.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ModelLoadError(f"{path}: `architectures` must be a list of model class names (like [\"LlamaForCausalLM\"]), "
                             f"got {json.dumps(config.get('architectures'))[:100]}")
    if "model_type" in config and not isinstance(config["model_type"], str):
        raise ModelLoadError(f"{path}: `model_type` must be a string (like \"llama\"), got {json.dumps(config['model_type'])[:100]}")
    for key, value in config.items():
        if _SIZE_FIELD.match(key) and isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ModelLoadError(f"{path}: `{key}` is {value}: a size or count cannot be negative")
    return architectures


def _task_note(directory: Path, task: str, architectures: Sequence[str]) -> str:
    """What a user who gave no task is told: the task inferred, and why."""
    note = (f"{directory}: task {task} inferred from config.json's architectures ({', '.join(architectures)}); "
            f"pass --task to load it as another ({_tasks()})")
    if task == "feature-extraction" and (directory / "modules.json").is_file():
        note += ("; it is a sentence-transformers model (modules.json): --task sentence-embedding gives the "
                 "attention-masked mean of its last hidden state, L2-normalised")
    return note


_CONVERT = "convert it to .safetensors: model.save_pretrained(DIR, safe_serialization=True)"


def _weights_file(directory: Path, name: Any, named_by: Path, what: str, suffix: str = ".safetensors") -> Path:
    """``name``, a weights file ``named_by`` names: a plain file name in ``directory`` ending with ``suffix``,
    present there (a link that leads out of the directory is refused too). Anything else is refused unread."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise WeightsError(f"{named_by} names {what} {json.dumps(name)[:100]}, which is not a file name in {directory}: "
                           "weights are read from the model's directory only; save the model again with model.save_pretrained(DIR)")
    if not name.endswith(suffix):
        raise WeightsError(f"{named_by} names {what} {name}, which is not a {suffix} file (a pickle such as .bin could run "
                           f"code when read): refused unread; {_CONVERT}")
    path = directory / name
    if not path.is_file():
        raise WeightsError(f"{named_by} names {what} {name}, which is not in {directory}: save the model again with "
                           "model.save_pretrained(DIR)")
    if path.resolve().parent != directory.resolve():
        raise WeightsError(f"{named_by} names {what} {name}, a link to a file outside {directory}: weights are read from the "
                           "model's directory only; put the file itself there")
    return path


def _index_shards(directory: Path, index: Path) -> list[Path]:
    data = read_json_object(index, WeightsError)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index} holds no weight map (\"weight_map\": tensor names to the names of shard files): save the "
                           "model again with model.save_pretrained(DIR)")
    return [_weights_file(directory, name, index, "the shard") for name in dict.fromkeys(weight_map.values())]


def weight_files(directory: Path, config: Mapping[str, Any]) -> list[Path]:
    """The .safetensors files transformers reads the weights of ``directory`` from
    (``config``: its config.json): the file config.json's ``transformers_weights``
    names, else ``model.safetensors``, else the shards ``model.safetensors.index.json``
    names, each a .safetensors file in the directory. Pickles are refused unread,
    whether they lie beside the weights or an index names them: unpickling can run code."""
    explicit = config.get("transformers_weights")
    if explicit is not None:
        if isinstance(explicit, str) and explicit.endswith(".safetensors.index.json"):
            index = _weights_file(directory, explicit, directory / "config.json", "its weights index (transformers_weights)",
                                  ".safetensors.index.json")
            return _index_shards(directory, index)
        return [_weights_file(directory, explicit, directory / "config.json", "its weights file (transformers_weights)")]
    if (directory / SAFE_WEIGHTS).is_file():
        return [directory / SAFE_WEIGHTS]
    if (directory / SAFE_INDEX).is_file():
        return _index_shards(directory, directory / SAFE_INDEX)
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{directory} holds its weights as pickle files ({', '.join(pickles[:3])}), which are refused unread: unpickling can "
            f"run code. {_CONVERT}"
        )
    raise WeightsError(f"{directory} holds no .safetensors weights ({SAFE_WEIGHTS}, or shards listed in {SAFE_INDEX}): save them "
                       "with model.save_pretrained(DIR)")


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
    per text), ``last_hidden_state`` (feature extraction), or
    ``last_hidden_state`` then ``sentence_embedding`` (the attention-masked
    mean of the last hidden state, L2-normalised). Per-token outputs are zero at padding positions
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
        """The task's own output (the last of :attr:`output_names`)."""
        return _OUTPUTS[self.actsparse_task][-1][0]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in _OUTPUTS[self.actsparse_task])

    @property
    def per_token(self) -> bool:
        return _OUTPUTS[self.actsparse_task][-1][1]

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
            return {"last_hidden_state": masked, "sentence_embedding": mean / mean.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)}
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
#: the default recipe's level, chosen by the cost on text unlike the calibration text (``tools/measure_hf_default.py``:
#: the MiniLM directory's sentence cosine on scikit-learn's dataset descriptions, calibrated on Python's documentation,
#: 0.947 at 25 %, 0.880 at 50 %, the level before)
DEFAULT_SPARSITY = 0.25


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

    from ..calibration.recipe import Recipe
    from ..nn.layers import WeightedKind, layer_kind

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
    from ..data.streams import text_lines

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
    ``directory`` (where the tokenizer is read from, when text is given);
    ``notes``: what the user is told about how it was loaded (the task inferred)."""

    model: HFModel
    directory: Path | None
    max_length: int | None = None
    _tokenizer: Any = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> Any:
        return self.model.config

    def tokenizer(self) -> Any:
        """The directory's tokenizer, loaded once (in a worker: see :func:`~actsparse_deploy.data.streams.run_tokenizer`)."""
        if self._tokenizer is None:
            if self.directory is None:
                raise UsageError("`text` needs a tokenizer, and a model from a factory has none: pass token ids as `data`")
            from transformers import AutoTokenizer

            from ..data.streams import run_tokenizer

            directory = self.directory
            _refuse_custom_code(directory / "tokenizer_config.json", DataError, "tokenizer")

            def load() -> Any:
                with _transformers_quiet():
                    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)

            def fails(e: BaseException) -> DataError:
                return DataError(
                    f"{directory} has no tokenizer that loads (tokenizer.json / tokenizer_config.json: {type(e).__name__}: "
                    f"{first_line(e)}): `text` needs one; save it there with tokenizer.save_pretrained(DIR), or pass token ids as `data`"
                )

            tokenizer = run_tokenizer(load, fails)
            _check_tokenizer_files(directory, tokenizer)
            self._tokenizer = tokenizer
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
        :class:`~actsparse_deploy.data.streams.TextStream` read whole (the commands stream it)."""
        from ..data.streams import TextStream

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
        axes = {name: dict(SEQUENCE_AXES) for name in inputs}
        for output, per_token in _OUTPUTS[self.model.task]:
            axes[output] = dict(SEQUENCE_AXES) if per_token else {0: "batch"}
        return inputs, axes


def _check_tokenizer_files(directory: Path, tokenizer: Any) -> None:
    """A tokenizer class that loads without the files it reads (``LlamaTokenizer``
    without ``tokenizer.json`` or ``tokenizer.model``) knows its special tokens only."""
    names = dict(getattr(type(tokenizer), "vocab_files_names", None) or {})
    others = [f for key, f in names.items() if key in ("vocab_file", "merges_file") and isinstance(f, str)]
    if not others or (directory / "tokenizer.json").is_file() or all((directory / f).is_file() for f in others):
        return  # a class that needs no vocabulary file (bytes as tokens), or its files are there
    raise DataError(
        f"{directory} lacks its tokenizer's files: tokenizer_config.json names {type(tokenizer).__name__}, which reads "
        f"tokenizer.json{' or ' + ' and '.join(others) if others else ''}, and none of them is there; save the tokenizer "
        "there with tokenizer.save_pretrained(DIR)"
    )


def _refuse_custom_code(path: Path, error: type[ActsparseError], what: str) -> dict[str, Any]:
    """The JSON object of ``config.json`` / ``tokenizer_config.json`` (empty where there is no such file).
    One that names its own code (``auto_map``) would have transformers import it: refused before any load."""
    data = read_json_object(path, error) if path.is_file() else {}
    if "auto_map" in data:
        raise error(
            f"{path} names its own code (auto_map): loading this {what} would run the directory's Python files; "
            "this tool loads only models and tokenizers transformers defines"
        )
    return data


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' load report and warnings are errors or nothing (accelerate's too, which loads a model
    block by block): one line is ours to print."""
    import logging

    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    accelerate = logging.getLogger("accelerate")
    level = accelerate.level
    accelerate.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        accelerate.setLevel(level)


def _reason(e: BaseException) -> str:
    """``first_line(e)``, with the line after it where the first only introduces it (ends with a colon)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return first_line(e) + " " + lines[1][:300]
    return first_line(e)


def _hf_config(directory: Path) -> Any:
    """config.json as transformers reads it (its own checks of each field's type)."""
    from transformers import AutoConfig

    try:
        with _transformers_quiet():
            return AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a field it cannot take
        raise ModelLoadError(f"{directory / 'config.json'} is not a configuration transformers can build a model from: "
                             f"{type(e).__name__}: {_reason(e)}") from e


class _TooManyModules(Exception):
    pass


def _header_sizes(files: Sequence[Path]) -> tuple[int, int]:
    """The tensors and the numbers (elements) in ``files``' safetensors headers (nothing else is read)."""
    from safetensors import safe_open

    from ..base.serialize import reason, unreadable

    tensors = elements = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors += 1
                    elements += math.prod(f.get_slice(key).get_shape())
        except BaseException as e:
            if not unreadable(e):
                raise
            raise WeightsError(f"the weights in {path} cannot be read ({reason(e)}): save them again with "
                               "model.save_pretrained(DIR)") from e
    return tensors, elements


def check_config_fits(directory: Path, auto: Any, config: Any, files: Sequence[Path]) -> nn.Module:
    """The model config.json describes, built on the meta device (no memory for its weights), against the
    weights' headers: a model with far more parameters than the files hold numbers (see
    :data:`PARAMETERS_PER_WEIGHT`), or with more than :data:`MODULES_PER_TENSOR` modules per tensor (stopped
    while it is built), could never be filled by them, and is refused before it is built for real.
    Returns the model on the meta device (its layout, no weights)."""
    from torch.nn.modules.module import register_module_module_registration_hook

    tensors, elements = _header_sizes(files)
    limit = MODULES_PER_TENSOR * tensors + 256
    modules = 0

    def count(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        nonlocal modules
        modules += 1
        if modules > limit:
            raise _TooManyModules

    names = ", ".join(p.name for p in files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
    handle = register_module_module_registration_hook(count)
    try:
        with torch.device("meta"), _transformers_quiet():
            model = auto.from_config(config)
        parameters = sum(p.numel() for p in model.parameters())  # tied weights once
        described, fits = f"{parameters:,} parameters", parameters <= PARAMETERS_PER_WEIGHT * elements + SLACK_PARAMETERS
    except _TooManyModules:
        described, fits = f"more than {limit:,} modules", False
    except Exception as e:  # the model's own code fails on the config
        raise ModelLoadError(f"cannot build a model from {directory / 'config.json'} ({auto.__name__}): {type(e).__name__}: "
                             f"{_reason(e)}") from e
    finally:
        handle.remove()
    if not fits:
        raise WeightsError(
            f"{directory / 'config.json'} describes a model of {described}, far more than its weights ({names}) hold: {tensors:,} "
            f"tensors of {elements:,} parameters cannot fill it; fix config.json's sizes (num_hidden_layers, hidden_size, "
            "vocab_size, ...) or save the model again with model.save_pretrained(DIR)"
        )
    return model


def _read_model_config(directory: Path, task: str | None) -> tuple[dict[str, Any], str, list[str]]:
    """config.json (checked), the task (``task``, else the one its architectures imply) and the notes to give."""
    path = directory / "config.json"
    config = _refuse_custom_code(path, ModelLoadError, "model")
    architectures = _architectures(config, path)
    if task is not None:
        return config, task, []
    the_task = _infer_task(architectures, str(directory))
    return config, the_task, [_task_note(directory, the_task, architectures)]


def load_hf(directory: str | Path, task: str | None = None, max_length: int | None = None, by_block: bool = False,
            layout_only: bool = False) -> HFSource:
    """The model saved in ``directory``, for ``task`` (default: the one its
    ``config.json`` architectures imply, said in the source's ``notes``), wrapped
    as an :class:`HFModel`. Its weights are checked first (:func:`weight_files`),
    and so are config.json's sizes against them (:func:`check_config_fits`).
    ``by_block``: its blocks' weights (:func:`~actsparse_deploy.nn.modules.largest_blocks`) stay in
    their files and are read a layer at a time while the layer runs (:func:`offload_blocks`);
    ``layout_only``: the model on the meta device, its weights unread (its modules' names and shapes)."""
    check_task(task)
    directory = Path(directory)
    config, the_task, notes = _read_model_config(directory, task)
    files = weight_files(directory, config)
    try:
        auto = _auto_class(the_task)
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise ModelLoadError(f"a Hugging Face model directory needs transformers: {e}") from e
    hf_config = _hf_config(directory)
    layout = check_config_fits(directory, auto, hf_config, files)
    if layout_only:
        return HFSource(wrap_pretrained(layout.eval(), the_task, str(directory)), directory, max_length, notes=notes)
    offload = offload_blocks(directory, layout) if by_block else {}
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on the user's terminal
    try:
        with _transformers_quiet():
            model, info = auto.from_pretrained(
                str(directory), config=hf_config, local_files_only=True, use_safetensors=True, attn_implementation="eager",
                output_loading_info=True, trust_remote_code=False, ignore_mismatched_sizes=True, **offload,
            )
    except BaseException as e:  # transformers raises many types; a weights file it cannot read is the weights' fault
        if not (isinstance(e, Exception) or is_panic(e)):
            raise
        kind = type(e).__name__
        if kind == "SafetensorError" or is_panic(e) or "safetensors" in str(e).lower() or "no file named" in str(e):
            raise WeightsError(f"the weights in {directory} cannot be read ({kind}: {first_line(e)}): save them again with "
                               "model.save_pretrained(DIR)") from e
        raise ModelLoadError(f"cannot load {directory} as a {the_task} model ({auto.__name__}): {kind}: {first_line(e)}") from e
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    _check_filled(directory, model, info, the_task, config)
    return HFSource(wrap_pretrained(model.eval(), the_task, str(directory)), directory, max_length, notes=notes)


def offload_blocks(directory: Path, layout: nn.Module) -> dict[str, Any]:
    """``from_pretrained``'s arguments that leave the blocks of ``layout`` (the model on the meta device) in
    their ``.safetensors`` files, each layer's weights read while it runs (accelerate's offloading; files that
    need no conversion are read in place, others are written once into a folder removed when the process
    ends): a :class:`MemoryBudgetError` where the model has no list of blocks to split it into."""
    from ..nn.modules import block_device_map, largest_blocks

    blocks = largest_blocks(layout)
    device_map = block_device_map(layout, blocks) if blocks is not None else None
    if device_map is None:
        raise MemoryBudgetError(f"{directory} cannot be calibrated block by block: its model ({type(layout).__name__}) has no list of "
                                "blocks that holds most of its weights; calibrate it on a machine with memory for all of them")
    try:
        import accelerate  # noqa: F401 (transformers reads offloaded weights through it)
    except ImportError as e:
        raise MemoryBudgetError(f"calibrating block by block needs the accelerate package ({e}): pip install accelerate") from e
    folder = tempfile.mkdtemp(prefix="actsparse-offload-")
    atexit.register(shutil.rmtree, folder, True)
    return {"device_map": device_map, "offload_folder": folder}


def _check_filled(directory: Path, model: nn.Module, info: Mapping[str, Any], task: str, config: Mapping[str, Any]) -> None:
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(k[0]) if isinstance(k, (tuple, list)) else str(k) for k in info.get("mismatched_keys") or []]
    if missing or mismatched:
        few = ", ".join((missing + mismatched)[:4]) + (" ..." if len(missing) + len(mismatched) > 4 else "")
        saved = ", ".join(_architectures(dict(config), directory / "config.json")) or "see config.json"
        raise WeightsError(
            f"the weights in {directory} do not fill a {type(model).__name__} for task {task} (missing or wrong: {few}): "
            f"those would be random; pass the `task` the model was saved for ({saved})"
        )
