"""Attention heads (``actsparse_deploy.nn.attention``): the query / key / value projections
of an attention output projection, found by name, with the rows each keeps when whole
heads go; grouped-query attention keeps whole key/value groups."""

from __future__ import annotations

import pytest
import torch
import transformers

from actsparse_deploy.base.errors import ConfigError
from actsparse_deploy.nn.attention import attention_outputs, find_heads, head_blocks


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=32, num_hidden_layers=2, vocab_size=50)
    return transformers.BertModel(config)


def _llama(kv_heads: int = 2) -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=kv_heads, intermediate_size=64,
                                      num_hidden_layers=2, vocab_size=50)
    return transformers.LlamaForCausalLM(config)


def test_bert_heads_keep_the_same_rows_in_query_key_and_value():
    heads = find_heads(_bert(), "encoder.layer.1.attention.output.dense")
    assert (heads.head_dim, heads.group, heads.heads, heads.block) == (8, 1, 4, 8)
    kept = torch.cat([torch.arange(0, 8), torch.arange(24, 32)])  # heads 0 and 3
    rows = heads.rows(kept)
    assert list(rows) == [f"encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value")]
    assert all(torch.equal(r, kept) for r in rows.values())


def test_grouped_query_heads_go_by_key_value_group():
    heads = find_heads(_llama(), "model.layers.0.self_attn.o_proj")
    assert (heads.head_dim, heads.group, heads.block) == (8, 4, 32)
    rows = heads.rows(torch.arange(32, 64))  # the second group: query heads 4-7, key/value head 1
    assert torch.equal(rows["model.layers.0.self_attn.q_proj"], torch.arange(32, 64))
    assert torch.equal(rows["model.layers.0.self_attn.k_proj"], torch.arange(8, 16))
    assert torch.equal(rows["model.layers.0.self_attn.v_proj"], torch.arange(8, 16))


def test_keeping_part_of_a_head_group_is_refused():
    heads = find_heads(_llama(), "model.layers.0.self_attn.o_proj")
    with pytest.raises(ConfigError, match="part of attention head group 1"):
        heads.rows(torch.arange(0, 40))  # group 0 and a quarter of group 1


def test_an_mlp_layer_and_a_fused_projection_are_not_heads():
    with pytest.raises(ConfigError, match="not an attention output projection"):
        find_heads(_bert(), "encoder.layer.0.intermediate.dense")  # in 32 == query's 32 outputs, but not an output projection
    with pytest.raises(ConfigError, match="not an attention output projection"):
        find_heads(_bert(), "encoder.layer.0.output.dense")  # BERT's MLP output, 32 inputs too

    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="not an attention output projection"):
        find_heads(gpt2, "h.0.attn.c_proj")  # a Conv1D after a fused query / key / value projection
    assert attention_outputs(gpt2) == []


def test_attention_outputs_lists_the_output_projections_only():
    assert attention_outputs(_llama()) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert attention_outputs(torch.nn.Sequential(torch.nn.Linear(4, 4))) == []


def test_head_blocks_says_whether_a_mask_removes_whole_heads():
    assert head_blocks(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2)
    assert not head_blocks(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2)
    assert not head_blocks(torch.ones(5), 2)
    assert head_blocks(torch.tensor([1.0, 0.0, 1.0]), 1)
