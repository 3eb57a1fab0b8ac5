"""The built-in ``tiny-lm``: a small Llama-architecture causal LM and its text.

The model is a ``transformers`` ``LlamaForCausalLM`` (RMSNorm, rotary position
embeddings, SwiGLU MLPs ``down_proj(silu(gate_proj(x)) * up_proj(x))``; 4 layers,
hidden 256, intermediate 768, vocabulary 4096, tied input / output embeddings,
about 4.5 M parameters) trained by ``python tools/train_tiny_lm.py`` on English
that ships with every Python: the reference documentation in
``pydoc_data.topics``. Its byte-level BPE tokenizer is trained by the same script
on the training text only; both ship in ``models/`` (``tiny-lm-tokenizer.json``,
``tiny-lm.safetensors``, float16 storage loaded as float32).

The documentation topics are cut once, by topic (a seeded shuffle of the sorted
topic names), into ``train``, ``calibration`` and ``heldout`` texts that share no
topic. Each split's text is tokenized topic by topic (an ``<|endoftext|>`` token
after each) into one token stream, cut into rows of ``SEQ_LEN`` tokens without
padding; the calibration and held-out data are ``CALIBRATION_ROWS`` /
``HELDOUT_ROWS`` rows spread evenly over their stream.

    >>> from actsparse_deploy.models.tinylm import split_topics, tiny_lm_batches
    >>> set(split_topics("heldout")) & set(split_topics("train"))
    set()
    >>> batch = tiny_lm_batches("heldout", batch_size=8)[0]
    >>> sorted(batch), tuple(batch["input_ids"].shape), int(batch["attention_mask"].min())
    (['attention_mask', 'input_ids'], (8, 64), 1)

With the shipped files (``load_tiny_lm`` raises ``ModelLoadError`` if they are missing):

    model = load_tiny_lm()
    perplexity(model, tiny_lm_batches("heldout"))   # HELDOUT_PERPLEXITY
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..base.constants import hub_offline, models_dir
from ..base.errors import DataError, ModelLoadError, WeightsError, first_line, is_panic

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

hub_offline()  # before transformers is first imported

__all__ = [
    "CALIBRATION_ROWS",
    "CONFIG",
    "DYNAMIC_AXES",
    "EOS_TOKEN",
    "HELDOUT_PERPLEXITY",
    "HELDOUT_ROWS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "SEQ_LEN",
    "SPLITS",
    "SPLIT_SEED",
    "TOKENIZER_FILENAME",
    "TRAIN_SCRIPT",
    "WEIGHTS_FILENAME",
    "TinyLM",
    "build_tiny_lm",
    "encode_texts",
    "load_tiny_lm",
    "load_tokenizer",
    "other_batches",
    "split_texts",
    "split_topics",
    "text_batches",
    "tiny_lm_batches",
    "token_rows",
    "token_stream",
]

CONFIG: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "use_cache": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}
"""The ``LlamaConfig`` keyword arguments of tiny-lm (token 0 is ``<|endoftext|>``)."""

EOS_TOKEN = "<|endoftext|>"
"""The tokenizer's one special token (id 0), appended after every topic."""

SPLIT_SEED = 20240607
"""Seed of the shuffle of the sorted topic names that cuts them into splits."""

SPLIT_CHARS: dict[str, int] = {"heldout": 40_000, "calibration": 40_000}
"""Topics are taken (in the shuffled order) into the held-out, then the
calibration split until each holds at least this many characters; the rest train."""

SPLITS = ("train", "calibration", "heldout")

SEQ_LEN = 64
"""Tokens per row of the calibration and held-out data."""

CALIBRATION_ROWS = 128
"""Rows of ``SEQ_LEN`` tokens in the calibration data."""

HELDOUT_ROWS = 64
"""Rows of ``SEQ_LEN`` tokens in the held-out data (4,032 predicted tokens)."""

HELDOUT_PERPLEXITY = 94.788367
"""Dense held-out perplexity of the shipped weights (float32 evaluation), as
printed by ``python tools/train_tiny_lm.py`` and stored in the weights' metadata
(a unigram model of the training text: 751.4 on the same tokens; the calibration
text: 44.2; 700 steps, 526 s of one CPU core)."""

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "logits": {0: "batch", 1: "sequence"},
}
"""Each input's and output's dynamic axes: tiny-lm's I/O spec (``zoo.get_builtin("tiny-lm").io_spec()``)."""

WEIGHTS_FILENAME = "tiny-lm.safetensors"
TOKENIZER_FILENAME = "tiny-lm-tokenizer.json"
TRAIN_SCRIPT = "python tools/train_tiny_lm.py"


# ------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=1)
def _topic_splits() -> dict[str, tuple[str, ...]]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(SPLIT_SEED).shuffle(names)
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    for name in names:
        split = next((s for s, size in SPLIT_CHARS.items() if chars[s] < size), "train")
        splits[split].append(name)
        chars[split] += len(topics[name])
    if not splits["train"]:
        raise DataError(f"pydoc_data.topics has {len(names)} topics: too few to leave any for training")
    return {split: tuple(sorted(names)) for split, names in splits.items()}


def split_topics(split: str) -> list[str]:
    """The ``pydoc_data.topics`` names of ``split`` (``train``, ``calibration``,
    ``heldout``; disjoint), sorted."""
    splits = _topic_splits()
    if split not in splits:
        raise DataError(f"unknown tiny-lm split {split!r}; valid splits: {', '.join(SPLITS)}")
    return list(splits[split])


def split_texts(split: str) -> list[str]:
    """The documentation texts of ``split``'s topics, in topic-name order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in split_topics(split)]


# -------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ModelLoadError(f"tiny-lm tokenizer not found at {path}; run `{TRAIN_SCRIPT}` to create it")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except BaseException as e:  # tokenizers raises a bare Exception for a malformed file, or panics
        if not (isinstance(e, Exception) or is_panic(e)):
            raise
        raise ModelLoadError(f"cannot read the tiny-lm tokenizer {path}: {type(e).__name__}: {first_line(e)}; "
                             f"run `{TRAIN_SCRIPT}` to recreate it") from e
    if tokenizer.token_to_id(EOS_TOKEN) != 0 or tokenizer.get_vocab_size() != CONFIG["vocab_size"]:
        raise ModelLoadError(
            f"{path} is not tiny-lm's tokenizer: expected {CONFIG['vocab_size']} tokens with {EOS_TOKEN} as id 0, "
            f"got {tokenizer.get_vocab_size()} with {EOS_TOKEN} as {tokenizer.token_to_id(EOS_TOKEN)}"
        )
    return tokenizer


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The shipped byte-level BPE tokenizer (``models/tiny-lm-tokenizer.json``), loaded once."""
    return _tokenizer_at(Path(path) if path is not None else models_dir() / TOKENIZER_FILENAME)


def encode_texts(texts: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """One int64 token stream: each text's tokens, then ``<|endoftext|>`` (id 0)."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(0)
    return torch.tensor(ids, dtype=torch.int64)


@functools.lru_cache(maxsize=4)
def _stream(split: str, tokenizer_path: Path) -> torch.Tensor:
    return encode_texts(split_texts(split), load_tokenizer(tokenizer_path))


def token_stream(split: str, tokenizer: str | Path | None = None) -> torch.Tensor:
    """``split``'s text as one int64 token stream (a fresh copy)."""
    path = Path(tokenizer) if tokenizer is not None else models_dir() / TOKENIZER_FILENAME
    split_topics(split)  # an unknown split fails here, before the tokenizer loads
    return _stream(split, path).clone()


def token_rows(stream: torch.Tensor, rows: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """``rows`` rows of ``seq_len`` consecutive tokens of ``stream``, spread evenly
    over it: of the stream's non-overlapping ``seq_len`` chunks, the ``rows`` at
    evenly spaced indices (first and last included)."""
    chunks = stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len)
    if rows > len(chunks):
        raise DataError(f"a stream of {len(stream)} tokens holds {len(chunks)} rows of {seq_len}, not {rows}")
    pick = torch.linspace(0, len(chunks) - 1, rows).round().to(torch.int64)
    return chunks[pick].clone()


_ROWS = {"calibration": CALIBRATION_ROWS, "heldout": HELDOUT_ROWS}


def tiny_lm_batches(
    split: str, batch_size: int = 8, tokenizer: str | Path | None = None
) -> list[dict[str, torch.Tensor]]:
    """The ``calibration`` (128 rows) or ``heldout`` (64 rows) data: batches of
    ``input_ids`` (batch, 64) and an all-ones ``attention_mask`` (no padding).
    ``tokenizer``: a tokenizer file other than the shipped one (the training script's)."""
    if split not in _ROWS:
        raise DataError(f"tiny-lm has data splits {', '.join(_ROWS)}, not {split!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    ids = token_rows(token_stream(split, tokenizer), _ROWS[split])
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(batch_size)]


def text_batches(texts: list[str], batch_size: int = 8, rows: int | None = None) -> list[dict[str, torch.Tensor]]:
    """``texts`` as tiny-lm's batches: one token stream (each text, then ``<|endoftext|>``) cut into
    rows of ``SEQ_LEN`` tokens, ``rows`` of them spread evenly (None: every whole row); a text too
    short for one row is a :class:`DataError`."""
    stream = encode_texts(texts, load_tokenizer())
    available = len(stream) // SEQ_LEN
    if available == 0:
        raise DataError(f"the text holds {len(stream)} tiny-lm tokens: fewer than one row of {SEQ_LEN}; give more text")
    ids = token_rows(stream, min(rows or available, available))
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(batch_size)]


def other_batches(batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """tiny-lm's second source, English of another kind than its documentation (the sentences of
    scikit-learn's dataset descriptions that MiniLM's "other" text is made of): up to ``HELDOUT_ROWS`` rows."""
    from .minilm import english_sentences

    return text_batches(english_sentences("other"), batch_size, HELDOUT_ROWS)


# ------------------------------------------------------------------------ model


class TinyLM(nn.Module):
    """``LlamaForCausalLM`` called as ``forward(input_ids, attention_mask=None) -> logits``.

    The wrapper builds the additive causal + padding mask ``(B, 1, T, T)`` itself
    (0 where a query may attend, the dtype's minimum elsewhere), which transformers
    passes on as it is: its own mask factory (packed-sequence detection, shortcuts
    that depend on the mask's values at trace time) never runs, so the graph is the
    same for any input and both ONNX exporters trace it. Eager attention.
    """

    def __init__(self, lm: LlamaForCausalLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.lm.model.embed_tokens.weight.dtype
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        allowed = causal[None, None, :, :]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        additive = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
        additive = additive.masked_fill(~allowed, torch.finfo(dtype).min)
        return self.lm(input_ids=input_ids, attention_mask=additive, use_cache=False).logits


def build_tiny_lm() -> TinyLM:
    """tiny-lm's architecture, randomly initialised (``torch.manual_seed`` first for a fixed one)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise ModelLoadError("tiny-lm needs transformers: pip install -c constraints.txt transformers") from e
    config = LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    return TinyLM(LlamaForCausalLM(config)).eval()


def load_tiny_lm(path: str | Path | None = None) -> TinyLM:
    """tiny-lm with its shipped weights (float16 on disk, float32 here), in eval mode."""
    from safetensors.torch import load_file

    from ..base.serialize import reason, unreadable

    path = Path(path) if path is not None else models_dir() / WEIGHTS_FILENAME
    if not path.is_file():
        raise ModelLoadError(f"weights of built-in model 'tiny-lm' not found at {path}; run `{TRAIN_SCRIPT}` to create them")
    try:
        state = load_file(path)
    except BaseException as e:
        if not unreadable(e):
            raise
        raise WeightsError(f"cannot read weights file {path}: {reason(e)}") from e
    model = build_tiny_lm()
    # tied embeddings: the file holds the input embedding once, the output layer shares it
    state = {f"lm.{k}": v.to(torch.float32) for k, v in state.items()}
    head, embedding = state.get("lm.lm_head.weight"), state.get("lm.model.embed_tokens.weight")
    if head is not None and (embedding is None or not torch.equal(head, embedding)):
        raise WeightsError(
            f"weights file {path}: tiny-lm ties its output layer to the input embedding, but lm_head.weight "
            f"differs from model.embed_tokens.weight; run `{TRAIN_SCRIPT}` to recreate it"
        )
    state.setdefault("lm.lm_head.weight", state.get("lm.model.embed_tokens.weight", torch.empty(0)))
    expected = model.state_dict()
    problems = [
        f"{len(missing)} tensor(s) missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        for missing in [[k.removeprefix("lm.") for k in expected if k not in state]] if missing
    ] + [
        f"{len(extra)} unexpected ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
        for extra in [[k.removeprefix("lm.") for k in state if k not in expected]] if extra
    ] + [
        f"{k.removeprefix('lm.')} is {list(v.shape)}, expected {list(expected[k].shape)}"
        for k, v in state.items() if k in expected and v.shape != expected[k].shape
    ][:3]
    if problems:
        raise WeightsError(
            f"weights file {path} does not fit built-in model 'tiny-lm': {'; '.join(problems)}; "
            f"run `{TRAIN_SCRIPT}` to recreate it"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()
