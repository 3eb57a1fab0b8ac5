"""What a runtime loads next to ``model.onnx``: an output folder that serving stacks open as it is.

Optimum's ``ORTModelFor...`` classes, ``transformers``' ``AutoTokenizer`` /
``AutoConfig`` and sentence-transformers' ONNX backend read a folder, not a file:
``config.json`` (the model type and sizes; without it Optimum cannot even tell
which library the model is for), the tokenizer's files, ``generation_config.json``
for a decoder, and a sentence-transformers model's module files (``modules.json``,
``1_Pooling/config.json``, ...). :func:`write_runtime_files` writes them for a
Hugging Face model directory or a built-in text model (``minilm``, ``tiny-lm``)
into a folder (``convert``'s staging folder) and returns their names, relative
and ``/``-separated, with the notes for the report:

- ``config.json``: the source's, with the fields the converted model changed made
  true where a standard field can say it (``intermediate_size``, GPT-2's ``n_inner``,
  OPT's ``ffn_dim``, where every MLP has the same width; checked against the model
  that config builds); where no one config can say it (widths per layer), the
  source's, and a note that it describes ``model.onnx``'s inputs and outputs, not a
  PyTorch checkpoint. A decoder's ``use_cache`` says whether ``model.onnx`` has a KV cache;
- ``generation_config.json`` for ``causal-lm``: the source's, else one made from the config;
- the tokenizer's files as the source has them (``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``, vocabulary / merges files); tiny-lm's made from its
  tokenizer file. One that transformers 5 saved (its ``TokenizersBackend`` class) is
  written as the ``PreTrainedTokenizerFast`` it is, with a ``special_tokens_map.json``:
  transformers 4, which Optimum runs on, reads it too;
- for ``sentence-embedding`` from a sentence-transformers directory: its
  ``modules.json``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``
  and its modules' folders (``1_Pooling/``): ``SentenceTransformer(folder, backend="onnx")``
  finds ``model.onnx`` at the root and reads its ``last_hidden_state``.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from actsparse_deploy.models.folder import write_runtime_files
    >>> written = write_runtime_files(Path(tempfile.mkdtemp()), "tiny-lm", "causal-lm")
    >>> written.names
    ('config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..base.errors import ModelLoadError, OutputError
from ..base.files import os_reason
from ..nn.attention import HEAD_FIELDS
from ..nn.modules import float_dtype
from .hf import HF_PREFIX, MLP_DOWN_PATTERNS, hf_directory, is_pretrained, read_json_object

if TYPE_CHECKING:
    from ..data.workload import Workload

__all__ = ["BUILTIN_SOURCES", "SENTENCE_TRANSFORMERS_FILES", "SPECIAL_TOKENS", "TOKENIZER_FILES", "WIDTH_FIELDS", "RuntimeFiles",
           "config_changes", "runtime_source", "write_runtime_files", "write_workload_files"]

#: the built-in models with a transformers config and a text tokenizer
BUILTIN_SOURCES = ("minilm", "tiny-lm")
#: the tokenizer files ``save_pretrained`` writes, copied where the source has them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
                   "chat_template.json")
#: a sentence-transformers directory's own files beside its modules' folders
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
#: tokenizer_config.json's special tokens, which special_tokens_map.json holds
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token", "additional_special_tokens")
#: config.json's field for the width of every MLP, by family (the first one the model's config has)
WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim")


@dataclass(frozen=True)
class RuntimeFiles:
    """The files written (names relative to the folder, ``/``-separated) and what the report says of them."""

    names: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def write_runtime_files(folder: Path, source: str | Path, task: str, model: nn.Module | None = None, *,
                        cache: bool = False) -> RuntimeFiles:
    """Write into ``folder`` what a runtime loads next to ``model.onnx`` (see the module's docstring).
    ``source``: a Hugging Face model directory (a ``Path``), or the name of a built-in text model
    (:data:`BUILTIN_SOURCES`); ``task``: what the ONNX model does (``causal-lm``: a decoder;
    ``sentence-embedding``: the module files too); ``model``: the converted model, whose sizes
    config.json is made to say (None: the source's); ``cache``: ``model.onnx`` is a decoder with a KV cache."""
    folder = Path(folder)
    if isinstance(source, str) and source == "tiny-lm":
        config, directory = _tiny_lm_config(), None
    else:
        directory = _source_directory(source)
        config = read_json_object(directory / "config.json", ModelLoadError)
    changes, notes = config_changes(config, model)
    config.update(changes)
    if task == "causal-lm":
        config["use_cache"] = cache
    try:
        names = [_write_json(folder / "config.json", config)]
        if task == "causal-lm":
            names.append(_generation_config(folder, directory))
        names += _tokenizer_files(folder, directory)
        if task == "sentence-embedding" and directory is not None:
            st_names, st_notes = _sentence_transformers_files(directory, folder)
            names, notes = names + st_names, notes + st_notes
    except OSError as e:
        raise OutputError(f"cannot write the files a runtime loads beside model.onnx to {folder}: {os_reason(e)}") from e
    if directory is not None and not any(name in TOKENIZER_FILES for name in names):
        notes.append(f"{directory} holds no tokenizer files, so neither does the output folder: save the tokenizer there with "
                     "tokenizer.save_pretrained(DIR) and convert again for one that loads as it is")
    return RuntimeFiles(tuple(names), tuple(notes))


def runtime_source(work: Workload) -> str | Path | None:
    """Where ``work``'s runtime files come from: its Hugging Face directory, or the name of
    a built-in text model; None for other models (a factory's, even a transformers one)."""
    if work.builtin is not None:
        return work.name if work.name in BUILTIN_SOURCES else None
    if work.task is None or not (work.name.startswith(HF_PREFIX) or ":" not in work.name):
        return None
    return hf_directory(work.name)


def write_workload_files(folder: Path, work: Workload, model: nn.Module, *, outdir: Path | None = None,
                         cache: bool = False) -> RuntimeFiles:
    """:func:`write_runtime_files` for ``work``'s source (nothing for a model without one), unless
    ``outdir``, where the files end up, is the source's own directory: its files are kept as they are."""
    source = runtime_source(work)
    if source is None:
        return RuntimeFiles()
    directory = None if source == "tiny-lm" else _source_directory(source)
    if outdir is not None and directory is not None and outdir.is_dir() and os.path.samefile(outdir, directory):
        return RuntimeFiles(notes=(
            f"the output folder {outdir} is the model's own directory: its config.json and tokenizer files are kept as they are "
            "(they describe the dense weights beside them); convert into another folder for one that loads as it is",))
    task = work.task if work.task is not None else work.builtin.task
    return write_runtime_files(folder, source, task, model, cache=cache)


def _source_directory(source: str | Path) -> Path:
    if isinstance(source, str) and source == "minilm":
        from .minilm import model_dir

        return model_dir()
    return Path(source)


# --- config.json -------------------------------------------------------------------------


def config_changes(config: Mapping[str, Any], model: nn.Module | None) -> tuple[dict[str, Any], list[str]]:
    """The fields of ``config`` (a config.json's object) that ``model``, the converted model,
    changed, and the notes for the report. Its MLPs' widths (the inputs of the layers
    :data:`~actsparse_deploy.models.hf.MLP_DOWN_PATTERNS` names), all the same, are
    its width field's (:data:`WIDTH_FIELDS`) where the model that field builds has the
    converted model's shapes; else nothing changes, and a note says config.json describes
    the ONNX graph's inputs and outputs, not a PyTorch checkpoint of the converted model."""
    pretrained = next((m for m in model.modules() if is_pretrained(m)), None) if model is not None else None
    if pretrained is None:
        return {}, []
    written = str(float_dtype(pretrained)).removeprefix("torch.")  # a bfloat16 source written as float16 says so
    dtype = {k: written for k in ("dtype", "torch_dtype") if k in config and config[k] != written}
    widths = _mlp_widths(pretrained)
    field = next((f for f in WIDTH_FIELDS if hasattr(pretrained.config, f)), None)
    changes = {field: widths[0]} if field is not None and widths and len(set(widths)) == 1 else {}
    if config.get(HEAD_FIELDS[0]) != getattr(pretrained.config, HEAD_FIELDS[0], None):  # pruned heads (a decoder with a cache)
        changes.update({k: getattr(pretrained.config, k) for k in HEAD_FIELDS if hasattr(pretrained.config, k)})
    differ = _shapes_differ(pretrained, changes)
    if not differ:
        return {**dtype, **{k: v for k, v in changes.items() if config.get(k) != v}}, []
    said = f"{field} {config.get(field)}" if field is not None and len(set(widths)) > 1 else "sizes"
    why = f"MLP widths {', '.join(map(str, widths))} by layer" if len(set(widths)) > 1 else f"{differ[0]}, which no standard field says"
    return dtype, [f"config.json keeps the source's {said}: the converted model has {why}; config.json describes model.onnx's "
                "inputs and outputs, not a PyTorch checkpoint of the converted model"]


def _mlp_widths(pretrained: nn.Module) -> list[int]:
    """The input widths of the MLP output projections, in layer order (one that is not a weighted layer any more,
    wrapped by squash's ``mul`` mode, is left out)."""
    from fnmatch import fnmatchcase

    from ..nn.layers import WeightedKind, layer_kind

    return [kind.in_features(module) for name, module in pretrained.named_modules()
            if any(fnmatchcase(name, p) for p in MLP_DOWN_PATTERNS) and isinstance(kind := layer_kind(module), WeightedKind)]


def _shapes_differ(pretrained: nn.Module, changes: Mapping[str, Any]) -> list[str]:
    """The tensors of ``pretrained`` whose shapes differ from those of the model its config with
    ``changes`` builds (on the meta device: no memory for weights), as ``name [shape]``."""
    base = next(c for c in type(pretrained).__mro__ if c.__module__.startswith("transformers."))
    config = copy.deepcopy(pretrained.config)
    for key, value in changes.items():
        setattr(config, key, value)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in base(config).state_dict().items()}
    return [f"{k} {list(v.shape)}" for k, v in pretrained.state_dict().items() if k in expected and tuple(v.shape) != expected[k]]


def _tiny_lm_config() -> dict[str, Any]:
    from transformers import LlamaConfig

    from .tinylm import CONFIG

    config = LlamaConfig(**CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    return json.loads(config.to_json_string())


def _write_json(path: Path, data: Mapping[str, Any] | list[Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path.name


def _generation_config(folder: Path, directory: Path | None) -> str:
    """The source's generation_config.json, else one made from the config.json written."""
    name = "generation_config.json"
    if directory is not None and (directory / name).is_file():
        shutil.copyfile(directory / name, folder / name)
        return name
    from transformers import AutoConfig, GenerationConfig

    GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(folder), local_files_only=True)).save_pretrained(str(folder))
    return name


# --- tokenizer and sentence-transformers files ------------------------------------------------


def _copied(directory: Path, folder: Path, names: tuple[str, ...] | list[str], prefix: str = "") -> list[str]:
    """Those of ``names`` that are files in ``directory`` (a link: the file it leads to), copied into ``folder``."""
    copied = []
    for name in names:
        if (directory / name).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(directory / name, folder / name)
            copied.append(prefix + name)
    return copied


def _tokenizer_files(folder: Path, directory: Path | None) -> list[str]:
    """The source's tokenizer files, copied (``directory`` None: tiny-lm's, made from its tokenizer file), in
    :data:`TOKENIZER_FILES`' order; one that only transformers 5 reads made one that transformers 4 reads too."""
    if directory is None:
        from transformers import PreTrainedTokenizerFast

        from .tinylm import CONFIG, EOS_TOKEN, load_tokenizer

        special = {key: EOS_TOKEN for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(), model_max_length=CONFIG["max_position_embeddings"],
                                            **special)
        names = [Path(p).name for p in tokenizer.save_pretrained(str(folder))]
    else:
        names = _copied(directory, folder, TOKENIZER_FILES)
    names += _readable_by_transformers_4(folder, names)
    order = {name: i for i, name in enumerate(TOKENIZER_FILES)}
    return sorted(dict.fromkeys(names), key=lambda n: order.get(n, len(order)))


def _readable_by_transformers_4(folder: Path, names: list[str]) -> list[str]:
    """transformers 5 saves a fast tokenizer as its ``TokenizersBackend`` class, which transformers 4 (what Optimum and
    sentence-transformers 5 run on) does not have, and writes no ``special_tokens_map.json``: the class both know,
    ``PreTrainedTokenizerFast`` (the same ``tokenizer.json``), its inputs said (transformers 4's class would add
    ``token_type_ids``, which a decoder's ``generate`` refuses), and the map from the special tokens of
    ``tokenizer_config.json``. The files written."""
    from transformers import PreTrainedTokenizerFast

    path = folder / "tokenizer_config.json"
    config = read_json_object(path, OutputError) if path.is_file() else {}
    if config.get("tokenizer_class") != "TokenizersBackend" or "tokenizer.json" not in names:
        return []
    config.pop("backend", None)
    config.setdefault("model_input_names", list(PreTrainedTokenizerFast.model_input_names))  # transformers 5's: ids and mask
    written = [_write_json(path, {**config, "tokenizer_class": "PreTrainedTokenizerFast"})]
    if "special_tokens_map.json" not in names:
        special = {key: config[key] for key in SPECIAL_TOKENS if config.get(key) is not None}
        written.append(_write_json(folder / "special_tokens_map.json", special))
    return written


def _sentence_transformers_files(directory: Path, folder: Path) -> tuple[list[str], list[str]]:
    """A sentence-transformers directory's own files and its modules' folders (each module's files),
    copied; nothing from another directory. Its Transformer module must be the directory itself
    (``"path": ""``), where ``model.onnx`` is."""
    path = directory / "modules.json"
    if not path.is_file():
        return [], []
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not readable JSON ({type(e).__name__}: {e}): sentence-transformers could not load "
                             "the converted model either") from e
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("path"), str) for m in modules):
        raise ModelLoadError(f"{path} is not a list of modules with a \"path\" each, as sentence-transformers writes it")
    folders = [m["path"] for m in modules if m["path"]]
    if any(str(m.get("type", "")).endswith(".Transformer") and m["path"] for m in modules):
        return [], [f"{path} puts its Transformer module in a folder, not beside config.json: its module files are not "
                    "written (sentence-transformers would look for model.onnx there)"]
    names = _copied(directory, folder, SENTENCE_TRANSFORMERS_FILES)
    for sub in folders:
        if Path(sub).name != sub or sub in (".", ".."):
            raise ModelLoadError(f"{path} names the module folder {sub!r}, which is not a folder of {directory}")
        if (directory / sub).is_dir():
            files = sorted(p.name for p in (directory / sub).iterdir() if p.is_file() and not p.name.startswith("."))
            names += _copied(directory / sub, folder / sub, files, prefix=f"{sub}/")
    return names, []
