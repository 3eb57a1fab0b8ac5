"""The output folder of ``convert`` loads as it is (``actsparse_deploy.models.folder``):
``config.json``, ``generation_config.json`` for decoders, the tokenizer's files and a
sentence-transformers directory's module files beside ``model.onnx``.

Optimum and sentence-transformers pin another ``transformers`` than ours, so they are
not installed here: what their loaders read is checked as a contract instead
(config.json's ``model_type`` and head counts, the output ``last_hidden_state``,
``modules.json`` and ``1_Pooling/config.json``; the file names). The models are the
tiny random ones of ``test_hf.py``, the shipped tiny-lm and the packaged MiniLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import torch

from ..helpers import MINILM_OUTDIRS, invoke
from .test_hf import HELD, ST_POOLING, HFFiles

TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")
#: what Optimum's ORTModelForCausalLM reads of config.json (the kv heads for model types such as llama)
DECODER_KEYS = ("model_type", "num_attention_heads", "num_key_value_heads", "hidden_size", "num_hidden_layers", "vocab_size")
POOLING = ST_POOLING


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> HFFiles:
    files = HFFiles(tmp_path_factory.mktemp("hf-folder"))
    files.sentence_transformers()  # the BERT directory as sentence-transformers saves one
    return files


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _ids(directory: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)(texts)["input_ids"]


def _convert(hf: HFFiles, source: Path, task: str, out: Path, *extra: object) -> dict[str, Any]:
    result = invoke("convert", source, "--task", task, "--text", hf.calib, "--heldout-text", hf.held, "--max-length", 8,
                    "--no-latency", "-o", out, *extra, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def llama_out(hf: HFFiles, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The Llama directory converted with the default recipe (half of every MLP's features), without a KV cache
    (its export takes a few times as long; the cached decoder's use_cache: test_config_says_...)."""
    out = tmp_path_factory.mktemp("llama-folder") / "out"
    return out, _convert(hf, hf.llama, "causal-lm", out, "--no-cache")


@pytest.fixture(scope="module")
def st_out(hf: HFFiles, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The sentence-transformers BERT directory converted with --task sentence-embedding."""
    out = tmp_path_factory.mktemp("st-folder") / "out"
    return out, _convert(hf, hf.root / "tiny-st", "sentence-embedding", out)


# --- a Hugging Face decoder ------------------------------------------------------------------


def test_a_converted_llama_folder_has_what_loaders_read(hf: HFFiles, llama_out: tuple[Path, dict[str, Any]]) -> None:
    from transformers import AutoConfig, GenerationConfig

    out, report = llama_out
    for name in ("config.json", "generation_config.json", *TOKENIZER):
        assert (out / name).is_file(), name
        assert report["files"][name] == (out / name).stat().st_size  # listed with its size
    assert _ids(out, HELD) == _ids(hf.llama, HELD)  # the source's tokenizer
    # saved by transformers 5 (TokenizersBackend): the class transformers 4 knows too, with its inputs said
    # (transformers 4's would add token_type_ids, which generate() refuses), and the special tokens' map it reads
    tokenizer_config = _json(out / "tokenizer_config.json")
    assert _json(hf.llama / "tokenizer_config.json")["tokenizer_class"] == "TokenizersBackend"
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in tokenizer_config
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]
    assert _json(out / "special_tokens_map.json") == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = AutoConfig.from_pretrained(str(out), local_files_only=True)
    source = _json(hf.llama / "config.json")
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    written = _json(out / "config.json")
    assert {k: written[k] for k in DECODER_KEYS} == {k: source[k] for k in DECODER_KEYS}
    # every MLP pruned to three quarters of its width (the default recipe): the config says so; use_cache, whether the graph has a KV cache
    assert written["intermediate_size"] == 96 and source["intermediate_size"] == 128
    graph = onnx.load(str(out / "model.onnx")).graph
    assert graph.output[0].name == "logits"
    assert written["use_cache"] is False and not any(i.name.startswith("past_key_values.") for i in graph.input)
    assert not any("describes" in note for note in report["notes"])
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == source["eos_token_id"]


def _narrowed(hf: HFFiles, widths: tuple[int, ...]) -> torch.nn.Module:
    """The Llama directory's model with each layer's MLP cut to its width (the first features kept)."""
    from actsparse_deploy.models.loading import load_model

    model = load_model(str(hf.llama)).module
    for layer, width in zip(model.model.layers, widths):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, width, bias=False)
            new.weight.data = old.weight.data[:width].clone()
            setattr(mlp, name, new)
        new = torch.nn.Linear(width, mlp.down_proj.out_features, bias=False)
        new.weight.data = mlp.down_proj.weight.data[:, :width].clone()
        mlp.down_proj = new
    return model


def test_config_says_a_uniform_width_and_notes_per_layer_widths(hf: HFFiles, tmp_path: Path) -> None:
    from actsparse_deploy.models.folder import write_runtime_files

    uniform = write_runtime_files(tmp_path / "a", hf.llama, "causal-lm", _narrowed(hf, (48, 48)), cache=True)
    written = _json(tmp_path / "a" / "config.json")
    assert written["intermediate_size"] == 48 and written["use_cache"] is True and uniform.notes == ()
    assert uniform.names[:2] == ("config.json", "generation_config.json") and set(TOKENIZER) <= set(uniform.names)
    mixed = write_runtime_files(tmp_path / "b", hf.llama, "causal-lm", _narrowed(hf, (48, 32)))
    assert _json(tmp_path / "b" / "config.json")["intermediate_size"] == 128  # the source's: no one width to say
    (note,) = mixed.notes
    assert "48, 32" in note and "describes model.onnx's inputs and outputs, not a PyTorch checkpoint" in note
    dense = write_runtime_files(tmp_path / "c", hf.llama, "causal-lm", load_model_of(hf.llama))
    assert _json(tmp_path / "c" / "config.json") == {**_json(hf.llama / "config.json"), "use_cache": False} and dense.notes == ()


def load_model_of(directory: Path) -> torch.nn.Module:
    from actsparse_deploy.models.loading import load_model

    return load_model(str(directory)).module


# --- sentence-transformers --------------------------------------------------------------------


def test_sentence_embedding_keeps_last_hidden_state_and_the_module_files(hf: HFFiles, st_out: tuple[Path, dict[str, Any]]) -> None:
    out, report = st_out
    source = hf.root / "tiny-st"
    assert report["export"]["outputs"] == ["last_hidden_state", "sentence_embedding"]  # what feature-extraction loaders read, first
    assert report["export"]["dynamic_axes"]["last_hidden_state"] == {"0": "batch", "1": "sequence"}
    assert report["export"]["dynamic_axes"]["sentence_embedding"] == {"0": "batch"}
    assert [o["output"] for o in report["validation"]["outputs"]] == ["last_hidden_state", "sentence_embedding"]
    for name in ("config.json", *TOKENIZER, *ST_FILES):
        assert report["files"][name] == (out / name).stat().st_size, name
    for name in ST_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert not (out / "2_Normalize").exists()  # the source has no such folder: Normalize needs none
    assert _json(out / "config.json")["model_type"] == "bert" and _ids(out, HELD) == _ids(source, HELD)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["last_hidden_state", "sentence_embedding"]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(str(out))(HELD, padding=True, return_tensors="np")
    feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "token_type_ids": 0 * batch["input_ids"]}
    hidden, sentence = session.run(None, {k: v.astype("int64") for k, v in feed.items()})
    mask = batch["attention_mask"][..., None].astype("float32")
    mean = (hidden * mask).sum(1) / mask.sum(1)  # the pooling 1_Pooling/config.json asks for, then Normalize
    torch.testing.assert_close(torch.from_numpy(sentence), torch.nn.functional.normalize(torch.from_numpy(mean), dim=1), rtol=1e-4, atol=1e-5)


def test_feature_extraction_writes_no_module_files(hf: HFFiles, tmp_path: Path) -> None:
    from actsparse_deploy.models.folder import write_runtime_files

    written = write_runtime_files(tmp_path, hf.root / "tiny-st", "feature-extraction")
    assert not (tmp_path / "modules.json").exists() and "generation_config.json" not in written.names
    assert set(written.names) == {"config.json", *TOKENIZER} and _json(tmp_path / "config.json") == _json(hf.bert / "config.json")


def test_the_packaged_minilm_directory_and_builtin(tmp_path: Path) -> None:
    from actsparse_deploy.models import minilm
    from actsparse_deploy.models.folder import write_runtime_files

    source = minilm.model_dir()
    texts = minilm.english_sentences("heldout")[:4]
    as_directory = write_runtime_files(tmp_path / "dir", source, "sentence-embedding")
    assert set(as_directory.names) == {"config.json", *TOKENIZER, "vocab.txt", *ST_FILES}
    for name in as_directory.names:
        assert (tmp_path / "dir" / name).read_bytes() == (source / name).read_bytes(), name
    assert _ids(tmp_path / "dir", texts) == _ids(source, texts)
    builtin = write_runtime_files(tmp_path / "builtin", "minilm", "embedding")
    assert set(builtin.names) == {"config.json", *TOKENIZER, "vocab.txt"}  # its outputs are its own (token_embeddings)
    config = _json(tmp_path / "builtin" / "config.json")
    assert (config["model_type"], config["num_attention_heads"], config["intermediate_size"]) == ("bert", 12, 1536)


# --- tiny-lm --------------------------------------------------------------------------------


def test_tiny_lm_folder_loads_with_its_own_token_ids(tmp_path: Path) -> None:
    from transformers import AutoConfig, GenerationConfig

    from actsparse_deploy.models import tinylm
    from actsparse_deploy.models.folder import write_runtime_files

    written = write_runtime_files(tmp_path, "tiny-lm", "causal-lm", cache=True)
    assert set(written.names) == {"config.json", "generation_config.json", *TOKENIZER}
    texts = tinylm.split_texts("heldout")[:3]
    expected = [tinylm.load_tokenizer().encode(t).ids for t in texts]
    assert _ids(tmp_path, texts) == expected
    # transformers 4 knows no TokenizersBackend (what transformers 5 writes): the class both know
    assert _json(tmp_path / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "backend" not in _json(tmp_path / "tokenizer_config.json")
    assert _json(tmp_path / "tokenizer_config.json")["model_input_names"] == ["input_ids", "attention_mask"]
    assert _json(tmp_path / "special_tokens_map.json") == {k: tinylm.EOS_TOKEN for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    config = AutoConfig.from_pretrained(str(tmp_path), local_files_only=True)
    assert config.architectures == ["LlamaForCausalLM"] and config.use_cache is True
    written_config = _json(tmp_path / "config.json")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert written_config[key] == tinylm.CONFIG[key], key
    assert written_config["model_type"] == "llama" and GenerationConfig.from_pretrained(str(tmp_path)).eos_token_id == 0


# --- publishing: subfolders, overwrite, the source's own directory --------------------------------


def test_an_existing_folder_is_kept_without_overwrite_and_replaced_with_it(hf: HFFiles, st_out: tuple[Path, dict[str, Any]],
                                                                          tmp_path: Path) -> None:
    from actsparse_deploy.app.pipeline import publish_staged
    from actsparse_deploy.base.errors import OutputError

    done, _ = st_out
    staging = tmp_path / "staging"
    shutil.copytree(done, staging)
    out = tmp_path / "out"
    out.mkdir()
    (out / "1_Pooling").write_text("a file where the folder goes")
    with pytest.raises(OutputError, match="1_Pooling is not a folder"):
        publish_staged(staging, out, {}, None, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["1_Pooling"]  # nothing moved
    (out / "1_Pooling").unlink()
    (out / "modules.json").write_text("[]")
    with pytest.raises(OutputError, match="modules.json already exists"):
        publish_staged(staging, out, {}, None, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["modules.json"]  # the folder it made is gone again
    publish_staged(staging, out, {}, None, overwrite=True)
    assert (out / "1_Pooling" / "config.json").read_bytes() == (done / "1_Pooling" / "config.json").read_bytes()
    assert (out / "modules.json").read_bytes() == (done / "modules.json").read_bytes()


def test_converting_into_the_source_directory_keeps_its_config(hf: HFFiles, tmp_path: Path) -> None:
    source = hf.copy(hf.bert, "bert-in-place")
    before = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    report = _convert(hf, source, "feature-extraction", source)
    assert {name: (source / name).read_bytes() for name in before} == before  # config.json, tokenizer files, weights
    assert "config.json" not in report["files"]
    assert any("the model's own directory" in note for note in report["notes"])


@pytest.mark.slow
@pytest.mark.background("minilm-torchscript")
def test_the_converted_builtin_minilm_folder(background: Any) -> None:
    from actsparse_deploy.models import minilm

    background.result("minilm-torchscript")
    out = background.folder("minilm") / MINILM_OUTDIRS["torchscript"]
    report = _json(out / "report.json")
    for name in ("config.json", *TOKENIZER, "vocab.txt"):
        assert report["files"][name] == (out / name).stat().st_size, name
    texts = minilm.english_sentences("heldout")[:4]
    assert _ids(out, texts) == _ids(minilm.model_dir(), texts)
