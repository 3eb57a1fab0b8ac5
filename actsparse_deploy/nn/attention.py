"""Attention heads: which projections make an attention output projection's input, head by head.

The input of an attention output projection (BERT's ``attention.output.dense``,
Llama's ``self_attn.o_proj``) is the heads' outputs side by side: feature ``j``
belongs to head ``j // head_dim``, and head ``h`` is made from the query rows of
head ``h`` and the key / value rows of its key/value head ``h // group`` (grouped-query
attention: ``group`` query heads share one). A whole group of heads can be removed:
the query, key and value projections lose its rows and the output projection its
columns, and the model computes the same for the heads left, where its code reads
the number of heads from the tensors (``view(..., -1, head_dim)``, as Hugging Face
models do); squash checks that on the example.

The projections are found by name in the modules around the output projection
(:data:`QUERY`, :data:`KEY`, :data:`VALUE`), the head size from the attention
module (``head_dim``, ``attention_head_size``) or its config.

    >>> import transformers
    >>> config = transformers.BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1)
    >>> model = transformers.BertModel(config)
    >>> heads = find_heads(model, "encoder.layer.0.attention.output.dense")
    >>> heads.query, heads.heads, heads.block
    ('encoder.layer.0.attention.self.query', 4, 16)
    >>> import torch
    >>> kept = torch.cat([torch.arange(0, 16), torch.arange(32, 64)])  # head 1 removed
    >>> {name.rsplit(".", 1)[1]: len(rows) for name, rows in heads.rows(kept).items()}
    {'query': 48, 'key': 48, 'value': 48}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base.errors import ConfigError

__all__ = ["HEAD_FIELDS", "KEY", "OUTPUT", "QUERY", "VALUE", "Heads", "attention_outputs", "describe_heads", "find_heads", "head_blocks",
           "head_config_refusal"]

#: the last part of a query / key / value projection's name, as model families call them
QUERY = ("query", "q_proj", "q_lin", "q")
KEY = ("key", "k_proj", "k_lin", "k")
VALUE = ("value", "v_proj", "v_lin", "v")
#: how many modules up from the output projection the projections are looked for
SEARCH_UP = 2
#: the names attention output projections end with, as model families call them
OUTPUT = ("attention.output.dense", ".o_proj", ".out_proj", ".out_lin")
#: the fields of a transformers config that say its attention's head counts and size (Llama's names)
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "head_dim")


@dataclass(frozen=True)
class Heads:
    """An output projection's input as attention heads: the ``query``, ``key`` and
    ``value`` projections (module names), ``head_dim`` features a head and ``group``
    query heads a key/value head; ``width`` input features in all."""

    query: str
    key: str
    value: str
    head_dim: int
    group: int
    width: int

    @property
    def block(self) -> int:
        """How many input features go together: a key/value head's query heads."""
        return self.head_dim * self.group

    @property
    def heads(self) -> int:
        """How many query heads."""
        return self.width // self.head_dim

    def blocks(self, kept: torch.Tensor) -> torch.Tensor:
        """The key/value heads ``kept`` (indices of input features kept) keeps whole,
        sorted; a :class:`ConfigError` where it keeps part of one."""
        is_kept = torch.zeros(self.width, dtype=torch.bool)
        is_kept[kept] = True
        per_block = is_kept.reshape(-1, self.block)
        partial = per_block.any(1) & ~per_block.all(1)
        if bool(partial.any()):
            raise ConfigError(
                f"the mask keeps part of attention head group {int(partial.nonzero()[0])} ({self.block} features: "
                f"{self.group} query head(s) of {self.head_dim}): a head is removed whole or not at all"
            )
        return per_block.all(1).nonzero().flatten()

    def rows(self, kept: torch.Tensor) -> dict[str, torch.Tensor]:
        """The output rows each projection keeps where the output projection keeps input features ``kept``."""
        blocks = self.blocks(kept)
        query = (blocks[:, None] * self.block + torch.arange(self.block)).flatten()
        kv = (blocks[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()
        return {self.query: query, self.key: kv, self.value: kv}


def head_blocks(vector: torch.Tensor, block: int) -> bool:
    """Whether a per-feature mask is constant over each run of ``block`` features (whole heads)."""
    if block <= 1 or vector.numel() % block:
        return block <= 1
    per = vector.reshape(-1, block)
    return bool((per == per[:, :1]).all())


def attention_outputs(model: nn.Module) -> list[str]:
    """The model's attention output projections whose heads :func:`find_heads` finds, in module order.

        >>> import transformers
        >>> config = transformers.BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=32, num_hidden_layers=2)
        >>> attention_outputs(transformers.BertModel(config))
        ['encoder.layer.0.attention.output.dense', 'encoder.layer.1.attention.output.dense']
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            try:
                find_heads(model, name)
            except ConfigError:
                continue
            found.append(name)
    return found


def describe_heads(model: nn.Module) -> dict[str, int]:
    """Where every attention layer of ``model`` has one number of query heads, one of key/value heads and one
    head size, and they are not what the config of each transformers model inside it says, that config says
    them now (:data:`HEAD_FIELDS`: a runtime lays out a decoder's cache by them, a loader builds the layers by
    them), where its class takes them (:func:`head_config_refusal`); the fields it set, else {}.

        >>> import transformers
        >>> config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
        ...                                   num_hidden_layers=1, vocab_size=16)
        >>> model = transformers.LlamaForCausalLM(config)
        >>> describe_heads(model)  # as it says
        {}
        >>> attention = model.model.layers[0].self_attn
        >>> for name in ("q_proj", "k_proj", "v_proj"):  # one key/value head and its two query heads removed
        ...     layer = getattr(attention, name)
        ...     setattr(attention, name, torch.nn.Linear(32, layer.out_features // 2, bias=False))
        >>> attention.o_proj = torch.nn.Linear(16, 32, bias=False)
        >>> describe_heads(model), model.config.num_key_value_heads
        ({'num_attention_heads': 2, 'num_key_value_heads': 1, 'head_dim': 8}, 1)
    """
    counts = set()
    for name in attention_outputs(model):
        heads = find_heads(model, name)
        value = model.get_submodule(heads.key)
        assert isinstance(value, nn.Linear)
        counts.add((heads.heads, value.out_features // heads.head_dim, heads.head_dim))
    if len(counts) != 1:
        return {}
    fields = dict(zip(HEAD_FIELDS, counts.pop()))
    configs = [c for c in _head_configs(model) if any(getattr(c, k, v) != v for k, v in fields.items() if k != "head_dim")]
    if not configs or head_config_refusal(model, fields) is not None:
        return {}
    for config in configs:
        for key, value in fields.items():
            if key != "num_key_value_heads" or hasattr(config, key):
                setattr(config, key, value)
    return fields


def head_config_refusal(model: nn.Module, fields: dict[str, int]) -> str | None:
    """Why the config of a transformers model inside ``model`` cannot say the head counts ``fields`` (its class's
    own checks, made on a copy: transformers' Llama config takes no head count that does not divide the hidden
    size); None where each can."""
    for config in _head_configs(model):
        try:
            type(config).from_dict({**config.to_dict(), **fields})
        except Exception as e:  # a config class checks its fields in its own ways
            return f"the config cannot say {fields[HEAD_FIELDS[0]]} attention heads: {type(e).__name__}: {str(e).strip().splitlines()[-1]}"
    return None


def _head_configs(model: nn.Module) -> list[Any]:
    """The configs (each once) of the transformers models inside ``model`` that say a number of attention heads."""
    return list({id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), HEAD_FIELDS[0])}.values())


def find_heads(model: nn.Module, consumer: str) -> Heads:
    """The attention heads of output projection ``consumer``: the one query, key and
    value ``nn.Linear`` within :data:`SEARCH_UP` modules above it, their head size, and
    checked widths; ``consumer`` is named as output projections are (:data:`OUTPUT`).
    A :class:`ConfigError` says what is missing."""
    layer = model.get_submodule(consumer)
    if not isinstance(layer, nn.Linear) or not consumer.endswith(OUTPUT):
        raise ConfigError(f"{consumer!r} is not an attention output projection (an nn.Linear named *{', *'.join(OUTPUT)})")
    parts = consumer.split(".")
    for up in range(1, SEARCH_UP + 1):
        if len(parts) <= up:
            break
        prefix = ".".join(parts[:-up])
        found = _projections(model.get_submodule(prefix), prefix, consumer)
        if found is not None:
            return _checked(model, layer, consumer, *found)
    raise ConfigError(
        f"no attention query / key / value projections (nn.Linear named one of {', '.join(QUERY[:3])} / ...) were found next to "
        f"{consumer!r}: its input is not attention heads this tool knows (a fused projection such as GPT-2's c_attn is not)"
    )


def _projections(scope: nn.Module, prefix: str, consumer: str) -> tuple[str, str, str] | None:
    names: dict[tuple[str, ...], list[str]] = {QUERY: [], KEY: [], VALUE: []}
    for name, module in scope.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if full == consumer or not isinstance(module, nn.Linear):
            continue
        for kind, found in names.items():
            if name.rsplit(".", 1)[-1] in kind:
                found.append(full)
    if all(len(found) == 1 for found in names.values()):
        return names[QUERY][0], names[KEY][0], names[VALUE][0]
    return None


def _checked(model: nn.Module, layer: nn.Linear, consumer: str, query: str, key: str, value: str) -> Heads:
    q, k, v = (model.get_submodule(name) for name in (query, key, value))
    assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear)
    head_dim = _head_dim(model.get_submodule(query.rpartition(".")[0]), q.out_features)
    width = layer.in_features
    where = f"attention output projection {consumer!r}"
    if head_dim is None or q.out_features != width or width % head_dim or k.out_features != v.out_features or k.out_features % head_dim:
        raise ConfigError(
            f"{where}: its input ({width} features) does not split into the heads of {query!r} ({q.out_features} outputs), "
            f"{key!r} ({k.out_features}) and {value!r} ({v.out_features}) with head size {head_dim}"
        )
    if width % k.out_features:
        raise ConfigError(f"{where}: {width // head_dim} query heads do not share {k.out_features // head_dim} key/value heads evenly")
    return Heads(query, key, value, head_dim, width // k.out_features, width)


def _head_dim(attention: nn.Module, width: int) -> int | None:
    """The head size the attention module says (``head_dim``, ``attention_head_size``, or its config's)."""
    for attr in ("head_dim", "attention_head_size", "dim_per_head"):
        value = getattr(attention, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(attention, "config", None)
    value = getattr(config, "head_dim", None)
    if isinstance(value, int) and value > 0:
        return value
    heads = getattr(config, "num_attention_heads", None) or getattr(attention, "num_heads", None) or getattr(attention, "n_heads", None)
    return width // heads if isinstance(heads, int) and heads > 0 and width % heads == 0 else None
