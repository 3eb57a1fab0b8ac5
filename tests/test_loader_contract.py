"""What the serving stack's loaders read of ``convert``'s output folder, checked without them.

``tools/check_loaders.py`` loads output folders with Optimum's ``ORTModelForCausalLM`` /
``ORTModelForFeatureExtraction`` and sentence-transformers' ONNX backend in an environment
of their own (they run on transformers 4.57, this project on transformers 5). What those
loaders rely on is kept here, read from optimum-onnx 0.1.0 (``onnxruntime/modeling_decoder.py``,
``modeling.py``, ``exporters/tasks.py``) and sentence-transformers 5.7 (``backend/load.py``):

- the files: ``model.onnx`` (the name Optimum looks for first; sentence-transformers: at the
  root or in ``onnx/``), ``config.json`` (without it Optimum cannot tell the library),
  ``generation_config.json`` for a decoder, the tokenizer's files;
- config.json's keys: ``model_type``, the head counts and hidden size (GPT-2's ``n_head`` /
  ``n_embd``), ``num_key_value_heads`` for the model types whose kv heads Optimum reads from it,
  ``head_dim`` for those whose head size it reads from it: from them Optimum builds the empty
  past of a first step, so they must give the graph's cache shape;
- the ONNX inputs and outputs: ``input_ids``, ``attention_mask``, ``position_ids`` (int64,
  ``(batch, sequence)``), ``past_key_values.{i}.key`` / ``.value`` in and ``present.{i}.key`` /
  ``.value`` out (float32, ``(batch, kv heads, length, head dim)``; a ``.key`` / ``.value`` in
  the names is how Optimum tells a cache), ``logits``; an encoder's ``last_hidden_state``
  (what ``ORTModelForFeatureExtraction`` and sentence-transformers read by name);
- ``tokenizer_config.json``'s class one that transformers 4 has (not transformers 5's ``TokenizersBackend``).

The encoder folders are tiny BERT directories converted here (a few seconds); the decoders'
converts export two decoders with a cache, so they are in the slow tier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from .helpers import invoke
from .models.test_hf import HFFiles

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")
#: the model types whose kv heads ORTModelForCausalLM reads from config.json's num_key_value_heads (others: the attention heads)
OPTIMUM_KV_HEADS = {"arcee", "deepseek_v3", "cohere", "gemma", "gemma3_text", "glm", "granite", "gpt_oss", "helium", "mistral", "llama",
                    "nemotron", "qwen2", "qwen3", "qwen3_moe", "smollm3", "stablelm"}
#: the model types whose head size it reads from config.json's head_dim (others: hidden size / attention heads)
OPTIMUM_HEAD_DIM = {"gemma", "gemma3_text", "gpt_oss", "nemotron"}
#: the ONNX inputs ORTModelForFeatureExtraction feeds (token_type_ids made zero when not given)
ENCODER_INPUTS = {"input_ids", "attention_mask", "token_type_ids"}
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
#: a graph's inputs or outputs: (name, element type, dims: an int where fixed, a label where dynamic)
Values = list[tuple[str, int, list[int | str]]]


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if k in config), None)


def optimum_cache_shape(config: dict[str, Any]) -> tuple[int, int]:
    """The (kv heads, head dim) of the empty past ORTModelForCausalLM feeds a first step, from config.json."""
    heads, hidden = _first(config, "num_attention_heads", "n_head"), _first(config, "hidden_size", "n_embd")
    kv = config["num_key_value_heads"] if config["model_type"] in OPTIMUM_KV_HEADS else heads
    head_dim = config["head_dim"] if config["model_type"] in OPTIMUM_HEAD_DIM else hidden // heads
    return kv, head_dim


# --- the contract, as checks that list what is wrong -------------------------------------------------


def file_problems(folder: Path, names: tuple[str, ...]) -> list[str]:
    return [f"no {name}" for name in names if not (folder / name).is_file()]


def config_problems(folder: Path, decoder: bool) -> list[str]:
    """config.json's keys that the loaders read."""
    if not (folder / "config.json").is_file():
        return ["no config.json"]
    config = _json(folder / "config.json")
    wanted = [("model_type",), ("num_attention_heads", "n_head"), ("hidden_size", "n_embd")]
    if decoder:
        wanted += [("num_hidden_layers", "n_layer"), ("vocab_size",)]
        wanted += [("num_key_value_heads",)] if config.get("model_type") in OPTIMUM_KV_HEADS else []
        wanted += [("head_dim",)] if config.get("model_type") in OPTIMUM_HEAD_DIM else []
    return [f"config.json has no {' / '.join(keys)}" for keys in wanted if _first(config, *keys) is None]


def tokenizer_problems(folder: Path) -> list[str]:
    """The tokenizer's files, its class one that transformers 4 has; and it loads here."""
    problems = file_problems(folder, TOKENIZER_FILES)
    if problems:
        return problems
    cls = _json(folder / "tokenizer_config.json").get("tokenizer_class")
    if isinstance(cls, str) and cls.endswith("Backend"):
        problems.append(f"tokenizer_config.json's class {cls} is transformers 5's only")
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers' own exception types
        problems.append(f"AutoTokenizer fails: {type(e).__name__}: {e}")
    return problems


def _io(values: Any) -> dict[str, tuple[int, list[int | str]]]:
    """name -> (element type, dims: an int where fixed, the label where dynamic)."""
    out = {}
    for v in values:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        out[v.name] = (v.type.tensor_type.elem_type, dims)
    return out


def _expect(io: dict[str, tuple[int, list[int | str]]], name: str, elem: int, rank: int, dynamic: tuple[int, ...]) -> list[str]:
    if name not in io:
        return [f"no {name}"]
    got_elem, dims = io[name]
    problems = [f"{name} is {TensorProto.DataType.Name(got_elem)}, not {TensorProto.DataType.Name(elem)}"] if got_elem != elem else []
    if len(dims) != rank:
        return [*problems, f"{name} has rank {len(dims)}, not {rank}"]
    return problems + [f"{name}'s axis {a} is fixed ({dims[a]}), not dynamic" for a in dynamic if isinstance(dims[a], int)]


def decoder_graph_problems(folder: Path) -> list[str]:
    """model.onnx as ORTModelForCausalLM runs it with a cache, its cache as config.json says it is."""
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    inputs, outputs = _io(graph.input), _io(graph.output)
    config = _json(folder / "config.json")
    layers = _first(config, "num_hidden_layers", "n_layer")
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    problems = [f"inputs {list(inputs)}, not {[*STEP_INPUTS, *past]}"] if set(inputs) != {*STEP_INPUTS, *past} else []
    problems += [f"outputs {list(outputs)}, not {['logits', *present]}"] if set(outputs) != {"logits", *present} else []
    for name in STEP_INPUTS:
        problems += _expect(inputs, name, INT64, 2, (0, 1))
    problems += _expect(outputs, "logits", FLOAT, 3, (0, 1))
    kv, head_dim = optimum_cache_shape(config)
    for io, names in ((inputs, past), (outputs, present)):
        for name in names:
            found = _expect(io, name, FLOAT, 4, (0, 2))
            if not found and io[name][1][1:4:2] != [kv, head_dim]:
                found = [f"{name} is {io[name][1]}: Optimum's empty past from config.json is (batch, {kv}, 0, {head_dim})"]
            problems += found
    return problems


def encoder_graph_problems(folder: Path, outputs: tuple[str, ...]) -> list[str]:
    """model.onnx as ORTModelForFeatureExtraction (and sentence-transformers) runs it: ``outputs`` first, by name."""
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    inputs, found = _io(graph.input), _io(graph.output)
    problems = [f"input {name} is none the loader feeds" for name in inputs if name not in ENCODER_INPUTS]
    for name in ("input_ids", "attention_mask", *(n for n in inputs if n == "token_type_ids")):
        problems += _expect(inputs, name, INT64, 2, (0, 1))
    problems += [f"outputs {list(found)} do not start with {list(outputs)}"] if tuple(found)[: len(outputs)] != outputs else []
    hidden = _first(_json(folder / "config.json"), "hidden_size", "n_embd")
    for name, rank in (("last_hidden_state", 3), ("sentence_embedding", 2)):
        if name in outputs:
            problem = _expect(found, name, FLOAT, rank, tuple(range(rank - 1)))
            problems += problem or ([f"{name}'s last axis is {found[name][1][-1]}, not {hidden}"] if found[name][1][-1] != hidden else [])
    return problems


def sentence_transformers_problems(folder: Path) -> list[str]:
    """The layout SentenceTransformer(folder, backend="onnx") loads: the Transformer module at the root, one
    ONNX file (model.onnx there or in onnx/), the modules' folders, the pooling as wide as the model."""
    problems = file_problems(folder, ST_FILES)
    if problems:
        return problems
    modules = _json(folder / "modules.json")
    if not modules or not modules[0]["type"].endswith(".Transformer") or modules[0]["path"] != "":
        problems.append(f"modules.json's first module is not the Transformer at the root: {modules[:1]}")
    problems += [f"module folder {m['path']} is missing" for m in modules[1:]
                 if not m["type"].endswith(".Normalize") and not (folder / m["path"]).is_dir()]
    onnx_files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.onnx"))
    if onnx_files not in (["model.onnx"], ["onnx/model.onnx"]):
        problems.append(f"ONNX files {onnx_files}: sentence-transformers loads one model.onnx, at the root or in onnx/")
    width = _json(folder / "1_Pooling" / "config.json").get("word_embedding_dimension")
    if (folder / "config.json").is_file() and width != _json(folder / "config.json").get("hidden_size"):
        problems.append(f"1_Pooling's word_embedding_dimension {width} is not config.json's hidden_size")
    return problems


def decoder_problems(folder: Path) -> list[str]:
    return (file_problems(folder, ("model.onnx", "config.json", "generation_config.json")) or config_problems(folder, decoder=True)
            or decoder_graph_problems(folder)) + tokenizer_problems(folder)


def encoder_problems(folder: Path, task: str) -> list[str]:
    outputs = ("last_hidden_state", "sentence_embedding") if task == "sentence-embedding" else ("last_hidden_state",)
    problems = (file_problems(folder, ("model.onnx", "config.json")) or config_problems(folder, decoder=False)
                or encoder_graph_problems(folder, outputs)) + tokenizer_problems(folder)
    return problems + (sentence_transformers_problems(folder) if task == "sentence-embedding" else [])


# --- encoders: tiny BERT directories, converted here ------------------------------------------------------


def _convert(hf: HFFiles, source: Path, task: str, out: Path, *extra: object) -> Path:
    result = invoke("convert", source, "--task", task, "--text", hf.calib, "--heldout-text", hf.held, "--max-length", 8, "--no-latency",
                    "--threads", 1, "-o", out, *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> HFFiles:
    files = HFFiles(tmp_path_factory.mktemp("contract-sources"))
    files.sentence_transformers()  # the BERT directory as sentence-transformers saves one
    return files


@pytest.fixture(scope="module")
def encoders(hf: HFFiles, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The BERT directory converted with --task feature-extraction, its sentence-transformers copy with sentence-embedding."""
    out = tmp_path_factory.mktemp("contract-encoders")
    return {"feature-extraction": _convert(hf, hf.bert, "feature-extraction", out / "fe"),
            "sentence-embedding": _convert(hf, hf.root / "tiny-st", "sentence-embedding", out / "se")}


@pytest.mark.parametrize("task", ["feature-extraction", "sentence-embedding"])
def test_converted_encoder_folders_hold_what_the_loaders_read(encoders: dict[str, Path], task: str) -> None:
    folder = encoders[task]
    assert encoder_problems(folder, task) == []
    assert _json(folder / "config.json")["model_type"] == "bert"
    assert _json(folder / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"  # the source's TokenizersBackend, made 4's
    assert (folder / "modules.json").is_file() is (task == "sentence-embedding")


def _break(folder: Path, how: str) -> None:
    """Undo one part of the contract in a copy of an output folder."""
    if how == "no config.json":
        (folder / "config.json").unlink()
    elif how == "tokenizer class":
        config = _json(folder / "tokenizer_config.json")
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    elif how == "sentence_embedding only":
        model = onnx.load(str(folder / "model.onnx"))
        model.graph.output.remove(next(o for o in model.graph.output if o.name == "last_hidden_state"))
        onnx.save(model, str(folder / "model.onnx"))
    elif how == "two onnx files":
        (folder / "onnx").mkdir()
        shutil.copyfile(folder / "model.onnx", folder / "onnx" / "model.onnx")
    elif how == "no pooling folder":
        shutil.rmtree(folder / "1_Pooling")


@pytest.mark.parametrize("how, needle", [
    ("no config.json", "no config.json"),
    ("tokenizer class", "TokenizersBackend is transformers 5's only"),
    ("sentence_embedding only", "do not start with ['last_hidden_state', 'sentence_embedding']"),
    ("two onnx files", "ONNX files ['model.onnx', 'onnx/model.onnx']"),
    ("no pooling folder", "no 1_Pooling/config.json"),
])
def test_the_contract_names_what_a_folder_lacks(encoders: dict[str, Path], tmp_path: Path, how: str, needle: str) -> None:
    folder = shutil.copytree(encoders["sentence-embedding"], tmp_path / "copy")
    _break(folder, how)
    problems = encoder_problems(folder, "sentence-embedding")
    assert any(needle in p for p in problems), problems


# --- decoders: the cache's shape Optimum derives from config.json -------------------------------------------


def _config(family: str) -> Any:
    import transformers as tf

    small = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
    return {
        "llama": lambda: tf.LlamaConfig(**small),
        "qwen2": lambda: tf.Qwen2Config(**small),
        "mistral": lambda: tf.MistralConfig(**small),
        "gemma": lambda: tf.GemmaConfig(**small, head_dim=16),  # not hidden / heads: Optimum reads head_dim
        "gemma3_text": lambda: tf.Gemma3TextConfig(**small, head_dim=16),
        "gpt2": lambda: tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4),
    }[family]()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma3_text", "gpt2", "tiny-lm"])
def test_optimum_reads_our_cache_shape_from_the_config_written(family: str, tmp_path: Path) -> None:
    from actsparse_deploy.models.decoder import CacheLayout
    from actsparse_deploy.models.folder import write_runtime_files

    source: str | Path
    if family == "tiny-lm":
        from transformers import LlamaConfig

        from actsparse_deploy.models.tinylm import CONFIG

        config, source = LlamaConfig(**CONFIG), "tiny-lm"
    else:
        config, source = _config(family), tmp_path / "source"
        config.save_pretrained(source)
    write_runtime_files(tmp_path / "out", source, "causal-lm", cache=True)
    written = _json(tmp_path / "out" / "config.json")
    layout = CacheLayout.of(SimpleNamespace(config=config))  # what the export lays the cache out by
    assert config_problems(tmp_path / "out", decoder=True) == []
    assert written["model_type"] == config.model_type and (tmp_path / "out" / "generation_config.json").is_file()
    assert optimum_cache_shape(written) == (layout.kv_heads, layout.head_dim)


def _decoder_folder(folder: Path, inputs: Values, outputs: Values) -> Path:
    """A folder with a Llama config.json (2 layers, 2 kv heads of 8) and a model.onnx of these inputs and outputs (no nodes)."""
    folder.mkdir()
    config = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32, "num_hidden_layers": 2,
              "vocab_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    values = [[helper.make_tensor_value_info(n, t, d) for n, t, d in io] for io in (inputs, outputs)]
    onnx.save(helper.make_model(helper.make_graph([], "decoder", *values)), str(folder / "model.onnx"))
    return folder


def _good_decoder_io() -> tuple[Values, Values]:
    step: Values = [(name, INT64, ["batch_size", "sequence_length"]) for name in STEP_INPUTS]
    past: Values = [(f"past_key_values.{i}.{kv}", FLOAT, ["batch_size", 2, "past_sequence_length", 8]) for i in range(2) for kv in ("key", "value")]
    present: Values = [(f"present.{i}.{kv}", FLOAT, ["batch_size", 2, "total", 8]) for i in range(2) for kv in ("key", "value")]
    return step + past, [("logits", FLOAT, ["batch_size", "sequence_length", 64]), *present]


@pytest.mark.parametrize("change, needle", [
    (None, None),
    ("no cache", "inputs ['input_ids', 'attention_mask', 'position_ids'], not"),
    ("int32 ids", "input_ids is INT32, not INT64"),
    ("3-D cache", "past_key_values.0.key has rank 3, not 4"),
    ("kv heads", "Optimum's empty past from config.json is (batch, 2, 0, 8)"),
    ("fixed batch", "position_ids's axis 0 is fixed (1), not dynamic"),
])
def test_the_decoder_graph_contract(tmp_path: Path, change: str | None, needle: str | None) -> None:
    inputs, outputs = _good_decoder_io()
    if change == "no cache":
        inputs, outputs = inputs[:3], outputs[:1]
    elif change == "int32 ids":
        inputs[0] = ("input_ids", TensorProto.INT32, inputs[0][2])
    elif change == "3-D cache":
        inputs[3] = (inputs[3][0], FLOAT, ["batch_size", "past_sequence_length", 16])
    elif change == "kv heads":
        outputs[1] = (outputs[1][0], FLOAT, ["batch_size", 4, "total", 8])
    elif change == "fixed batch":
        inputs[2] = ("position_ids", INT64, [1, "sequence_length"])
    problems = decoder_graph_problems(_decoder_folder(tmp_path / "folder", inputs, outputs))
    assert (problems == []) if needle is None else any(needle in p for p in problems), problems


# --- decoders: converted Hugging Face directories (slow: each exports two decoders with a cache) ----------------


@pytest.fixture(scope="module")
def gpt2_dir(hf: HFFiles) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = hf.root / "tiny-gpt2"
    if not folder.exists():
        import torch

        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=hf.vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval().save_pretrained(folder)
        for name in TOKENIZER_FILES:
            if (hf.llama / name).is_file():
                shutil.copyfile(hf.llama / name, folder / name)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_converted_decoder_folders_hold_what_optimum_reads(hf: HFFiles, gpt2_dir: Path, tmp_path: Path, family: str) -> None:
    source = hf.llama if family == "llama" else gpt2_dir
    folder = _convert(hf, source, "causal-lm", tmp_path / "out")
    assert decoder_problems(folder) == []
    config, report = _json(folder / "config.json"), _json(folder / "report.json")
    assert config["model_type"] == family and config["use_cache"] is True
    generation = report["validation"]["generation"]  # what tools/check_loaders.py has Optimum's generate() give again
    assert generation["tokens_identical"] and len(generation["tokens"]) == len(generation["prompt_ids"]) >= 1
    assert all(len(t) == generation["new_tokens"] for t in generation["tokens"])
