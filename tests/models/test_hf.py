"""Hugging Face model directories (``actsparse_deploy.models.hf``): loaded offline with
the Auto class of their task, named tensors in and out, their tokenizer making
batches of text files; and ``--factory-args`` for a ``module:factory``.

The models are tiny and random (built from configs, saved with
``save_pretrained`` into a temporary directory with a byte-level BPE tokenizer
trained on a few lines): nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ..helpers import invoke, one_line_error, user_module

LINES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model of text runs on two cores",
    "hello world and hello again to every reader",
    "masks remove the features a layer never needs",
    "calibration data shows which features matter",
    "the exporter writes a model that onnxruntime runs",
    "sparse models can be faster than dense ones",
    "every test builds its own tiny model",
]
HELD = ["the lazy dog sleeps all day", "a reader of text", "features matter for a small layer"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(LINES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _bert(vocab: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=64)
    return BertModel(config).eval()


#: a sentence-transformers directory's 1_Pooling/config.json for the tiny BERT (hidden 32): masked mean
ST_POOLING = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
              "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}


class HFFiles:
    """A Llama and a BERT directory (model + tokenizer), text files, and copies to break."""

    def __init__(self, root: Path) -> None:
        self.root = root
        tokenizer = _tokenizer()
        self.vocab = len(tokenizer)
        self.llama, self.bert = root / "tiny-llama", root / "tiny-bert"
        for directory, model in ((self.llama, _llama(self.vocab)), (self.bert, _bert(self.vocab))):
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
        self.calib = self.text("calib.txt", "\n".join(LINES[:4] + [""] + LINES[4:]) + "\n")
        self.held = self.text("held.txt", "\n".join(HELD) + "\n")

    def text(self, name: str, content: str) -> Path:
        path = self.root / name
        path.write_text(content, encoding="utf-8")
        return path

    def sentence_transformers(self, name: str = "tiny-st") -> Path:
        """A copy of the BERT directory as sentence-transformers saves one: modules.json, its configs, 1_Pooling/."""
        st = self.copy(self.bert, name)
        (st / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ], indent=2))
        (st / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8, "do_lower_case": False}))
        (st / "config_sentence_transformers.json").write_text(json.dumps({"__version__": {"sentence_transformers": "5.0.0"}}))
        (st / "1_Pooling").mkdir(exist_ok=True)
        (st / "1_Pooling" / "config.json").write_text(json.dumps(ST_POOLING, indent=2))
        return st

    def copy(self, source: Path, name: str, drop: tuple[str, ...] = ()) -> Path:
        target = self.root / name
        if not target.exists():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(*drop))
        return target


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> HFFiles:
    return HFFiles(tmp_path_factory.mktemp("hf"))


# --- the done-when: a Llama directory converts with default flags -------------------------


@pytest.mark.slow  # a dynamo export with a cache and the generation check: about 20 s
def test_llama_directory_converts_with_default_flags(hf: HFFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"  # the latency (two more exports with a cache) is the slow tier's: test_decoder.py
    result = invoke("convert", hf.llama, "--task", "causal-lm", "--text", hf.calib, "--heldout-text", hf.held, "-o", out, "--json",
                    "--no-latency")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # a causal LM is a decoder with a KV cache, Optimum's names and layout
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert report["export"]["inputs"] == ["input_ids", "attention_mask", "position_ids", *past]
    assert report["export"]["outputs"] == ["logits", *[f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]]
    assert report["export"]["cache"] is True
    axes = report["export"]["dynamic_axes"]
    assert axes["input_ids"] == axes["position_ids"] == axes["logits"] == {"0": "batch_size", "1": "sequence_length"}
    assert axes["attention_mask"] == {"0": "batch_size", "1": "total_sequence_length"}
    assert all(axes[name] == {"0": "batch_size", "2": "past_sequence_length"} for name in past)
    # the default recipe: each layer's MLP down projection, per feature, a quarter of them (chosen by the cost on text
    # unlike the calibration text: tools/measure_hf_default.py; half of them cost MiniLM 0.12 cosine there)
    assert [row["layer"] for row in report["layers"]] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert report["overall_sparsity"] == pytest.approx(0.25)
    assert {(row["method"], row["compensate"]) for row in report["layers"]} == {("obs", "lstsq")}  # the tool's default method
    assert report["validation"]["passed"] is True
    assert report["calibration"]["samples"] == len(LINES)  # the blank line skipped
    assert report["cost"]["perplexity_onnx"] == pytest.approx(report["cost"]["perplexity_sparse"], rel=1e-4)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    kv = {i.name: i.shape for i in session.get_inputs()}[past[0]]
    for batch, length, before in ((1, 3, 0), (3, 11, 4)):  # lengths and a past none of the export example's
        ids = np.arange(batch * length, dtype=np.int64).reshape(batch, length) % hf.vocab
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, before + length), np.int64),
                 "position_ids": np.arange(before, before + length)[None].repeat(batch, 0),
                 **{name: np.zeros((batch, kv[1], before, kv[3]), np.float32) for name in past}}
        logits, *present = session.run(None, feeds)
        assert logits.shape == (batch, length, hf.vocab) and present[0].shape == (batch, kv[1], before + length, kv[3])
    # validate checks the decoder as convert did: first steps, then token by token against PyTorch's cache
    checked = invoke("validate", out / "model.onnx", hf.llama, "--task", "causal-lm", "--heldout-text", hf.held,
                     "--masks", out / "masks.safetensors", "--json")
    assert checked.exit_code == 0, checked.output
    again = json.loads(checked.stdout)
    assert again["validation"]["passed"] is True and again["validation"]["generation"]["passed"] is True
    assert again["cost"]["perplexity_onnx"] == pytest.approx(report["cost"]["perplexity_onnx"], rel=1e-4)
    # the export stage writes the decoder convert writes (with its cache; --no-cache: one full pass), and validate takes it
    staged = tmp_path / "staged.onnx"
    exported = invoke("export", hf.llama, "--task", "causal-lm", "--heldout-text", hf.held, "--masks", out / "masks.safetensors",
                      "-o", staged, "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["export"]["inputs"] == report["export"]["inputs"]
    checked = invoke("validate", staged, hf.llama, "--task", "causal-lm", "--heldout-text", hf.held, "--masks", out / "masks.safetensors")
    assert checked.exit_code == 0, checked.output
    full = invoke("export", hf.llama, "--task", "causal-lm", "--heldout-text", hf.held, "--no-cache", "-o", tmp_path / "full.onnx", "--json")
    assert full.exit_code == 0 and json.loads(full.stdout)["export"]["inputs"] == ["input_ids", "attention_mask"], full.output


def test_llama_directory_without_cache_is_one_full_pass(hf: HFFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("convert", hf.llama, "--task", "causal-lm", "--text", hf.calib, "--heldout-text", hf.held, "-o", out, "--json",
                    "--no-cache", "--no-latency")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["export"]["inputs"] == ["input_ids", "attention_mask"] and report["export"]["outputs"] == ["logits"]
    assert report["export"]["cache"] is False
    for name in ("input_ids", "attention_mask", "logits"):
        assert report["export"]["dynamic_axes"][name] == {"0": "batch", "1": "sequence"}


def test_cache_is_for_causal_language_models_and_dynamo(hf: HFFiles, tmp_path: Path) -> None:
    result = invoke("convert", hf.bert, "--task", "feature-extraction", "--text", hf.calib, "--heldout-text", hf.held,
                    "-o", tmp_path / "a", "--cache")
    one_line_error(result, 2, "--cache is for causal language models")
    result = invoke("convert", hf.llama, "--task", "causal-lm", "--text", hf.calib, "--heldout-text", hf.held,
                    "-o", tmp_path / "b", "--exporter", "torchscript")
    one_line_error(result, 9, "dynamo exporter only", "--no-cache")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bert_directory_sentence_embedding_converts(hf: HFFiles, tmp_path: Path) -> None:
    result = invoke("convert", hf.bert, "--task", "sentence-embedding", "--text", hf.calib, "--heldout-text", hf.held,
                    "--max-length", 8, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["export"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert report["export"]["outputs"] == ["last_hidden_state", "sentence_embedding"]  # what feature-extraction loaders read, too
    assert report["export"]["dynamic_axes"]["sentence_embedding"] == {"0": "batch"}
    assert [row["layer"] for row in report["layers"]] == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]


# --- the wrapped model: named tensors in, a dict of named tensors out ------------------------


def test_causal_lm_outputs_are_the_models_logits(hf: HFFiles) -> None:
    from transformers import AutoModelForCausalLM

    from actsparse_deploy.models.loading import load_model

    loaded = load_model(str(hf.llama))
    assert loaded.hf.model.task == "causal-lm"  # from config.json's architectures
    batch = loaded.hf.text_batches(hf.held, batch_size=3)[0]
    mask = batch["attention_mask"]
    assert int(mask.min()) == 0 and int(mask[:, -1].max()) == 1  # padded to the longest text, on the right
    with torch.no_grad():
        out = loaded.module(**batch)
        raw = AutoModelForCausalLM.from_pretrained(hf.llama, local_files_only=True, attn_implementation="eager").eval()
        expected = raw(**batch, use_cache=False).logits
    assert list(out) == ["logits"]  # a dict: no cache, no ModelOutput
    keep = mask.bool()
    torch.testing.assert_close(out["logits"][keep], expected[keep])
    assert float(out["logits"][~keep].abs().max()) == 0.0  # padding positions carry no meaning


def test_sentence_embedding_is_the_normalised_masked_mean(hf: HFFiles) -> None:
    from transformers import AutoModel

    from actsparse_deploy.models.loading import ModelOptions, load_model

    loaded = load_model(str(hf.bert), options=ModelOptions(task="sentence-embedding"))
    batch = loaded.hf.text_batches(hf.held, batch_size=3)[0]
    with torch.no_grad():
        out = loaded.module(**batch)
        hidden = AutoModel.from_pretrained(hf.bert, local_files_only=True, attn_implementation="eager")(**batch).last_hidden_state
    assert list(out) == ["last_hidden_state", "sentence_embedding"]  # the hidden state it pools, first
    embedding = out["sentence_embedding"]
    weights = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(out["last_hidden_state"], hidden * weights)
    mean = (hidden * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(embedding, mean / mean.norm(dim=1, keepdim=True))
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(3))


def test_text_batches_truncate_and_pad_per_batch(hf: HFFiles) -> None:
    from actsparse_deploy.models.loading import ModelOptions, load_model

    loaded = load_model(str(hf.llama), options=ModelOptions(max_length=5))
    batches = loaded.hf.text_batches(hf.calib, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 2]  # 8 texts, the blank line skipped
    assert all(b["input_ids"].shape[1] <= 5 for b in batches)
    full = load_model(str(hf.llama)).hf.text_batches(hf.calib, batch_size=3)
    lengths = [b["input_ids"].shape[1] for b in full]
    assert max(lengths) > 5 and len(set(lengths)) > 1  # each batch padded to its own longest text
    jsonl = hf.text("calib.jsonl", "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(LINES)) + "\n\n")
    from_jsonl = load_model(str(hf.llama)).hf.text_batches(jsonl, batch_size=3)
    for a, b in zip(from_jsonl, full):
        torch.testing.assert_close(a["input_ids"], b["input_ids"])


def test_inspect_lists_a_directorys_layers(hf: HFFiles) -> None:
    result = invoke("inspect", hf.llama, "--json")
    assert result.exit_code == 0, result.output
    rows = {row["layer"]: row for row in json.loads(result.stdout)["layers"]}
    assert rows["model.layers.1.mlp.down_proj"]["input_shape"] == [1, 8, 128]
    assert rows["model.layers.1.mlp.down_proj"]["foldable"] is True
    explicit = invoke("inspect", f"hf:{hf.llama}", "--text", hf.held, "--json")
    assert explicit.exit_code == 0, explicit.output
    assert json.loads(explicit.stdout)["layers"][0]["input_shape"][0] == len(HELD)


def test_calibrate_then_export_and_validate_a_directory(hf: HFFiles, tmp_path: Path) -> None:
    masks, onnx_path = tmp_path / "m.safetensors", tmp_path / "m.onnx"
    result = invoke("calibrate", hf.llama, "--text", hf.calib, "--layers", "model.layers.*.mlp.down_proj", "--sparsity", 0.25,
                    "--structured", "-o", masks)
    assert result.exit_code == 0, result.output
    result = invoke("export", hf.llama, "--masks", masks, "--mode", "fold", "--heldout-text", hf.held, "-o", onnx_path, "--json",
                    "--no-cache")  # one full pass (with its cache: test_llama_directory_converts_with_default_flags)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["export"]["inputs"] == ["input_ids", "attention_mask"]
    result = invoke("validate", onnx_path, hf.llama, "--masks", masks, "--mode", "fold", "--heldout-text", hf.held, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["validation"]["passed"] is True


# --- refused with a reason ---------------------------------------------------------------------


def test_task_that_the_config_does_not_tell_is_asked_for(hf: HFFiles) -> None:
    masked_lm = hf.copy(hf.bert, "masked-lm")
    config = json.loads((masked_lm / "config.json").read_text())
    (masked_lm / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    result = invoke("inspect", masked_lm)
    line = one_line_error(result, 4)
    assert "BertForMaskedLM" in line and "--task" in line and "causal-lm" in line and "sentence-embedding" in line
    assert invoke("inspect", masked_lm, "--task", "feature-extraction").exit_code == 0
    bad = invoke("inspect", masked_lm, "--task", "translation")
    one_line_error(bad, 2, "translation")


def test_pickle_weights_are_refused_unread(hf: HFFiles, tmp_path: Path) -> None:
    directory = hf.copy(hf.llama, "pickled", drop=("*.safetensors",))
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"evil": Evil()}, directory / "pytorch_model.bin")
    result = invoke("inspect", directory)
    line = one_line_error(result, 5)
    assert "pytorch_model.bin" in line and "pickle" in line and ".safetensors" in line
    assert not marker.exists()
    empty = hf.copy(hf.llama, "no-weights", drop=("*.safetensors",))
    result = invoke("inspect", empty)
    one_line_error(result, 5, "no .safetensors weights")


def test_weights_that_leave_the_task_head_random_are_refused(hf: HFFiles) -> None:
    result = invoke("inspect", hf.bert, "--task", "sequence-classification")
    line = one_line_error(result, 5)
    assert "classifier" in line and "random" in line


def test_directory_without_config_or_missing_hf_path(hf: HFFiles, tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    result = invoke("inspect", tmp_path / "plain")
    one_line_error(result, 4, "config.json")
    result = invoke("inspect", f"hf:{tmp_path / 'absent'}")
    one_line_error(result, 4, "does not exist")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (None, None, "does not exist"),
        ("blank.txt", "\n  \n\n", "holds no text"),
        ("bad.jsonl", '{"text": "fine"}\n{"text": "cut\n', "line 2: not JSON"),
        ("field.jsonl", '{"body": "no text field"}\n', 'line 1: needs a "text" field'),
        ("latin.txt", None, "not readable UTF-8"),
    ],
)
def test_bad_text_files_are_data_errors(hf: HFFiles, tmp_path: Path, name: str | None, content: str | None, expected: str) -> None:
    if name is None:
        path = tmp_path / "absent.txt"
    elif content is None:
        path = tmp_path / name
        path.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    else:
        path = hf.text(name, content)
    result = invoke("calibrate", hf.llama, "--text", path, "-o", tmp_path / "m.safetensors")
    line = one_line_error(result, 6)
    assert expected in line and str(path.name) in line
    assert not (tmp_path / "m.safetensors").exists()


def test_text_without_a_tokenizer_or_for_another_model(hf: HFFiles, tmp_path: Path) -> None:
    bare = hf.copy(hf.llama, "no-tokenizer", drop=("tokenizer*", "special_tokens_map.json"))
    result = invoke("calibrate", bare, "--text", hf.calib, "-o", tmp_path / "m.safetensors")
    line = one_line_error(result, 6)
    assert "no tokenizer" in line and "--text" in line and "--data" in line
    result = invoke("calibrate", "digits-mlp", "--text", hf.calib, "-o", tmp_path / "m.safetensors")
    one_line_error(result, 2, "Hugging Face")  # a flag for another kind of model: usage
    result = invoke("calibrate", "digits-mlp", "--task", "causal-lm", "-o", tmp_path / "m.safetensors")
    one_line_error(result, 4, "--task")
    result = invoke("convert", hf.llama, "--text", hf.calib, "--heldout-text", hf.calib, "-o", tmp_path / "out")
    one_line_error(result, 6, "calibration")


def test_tokenizer_of_another_vocabulary_is_named(hf: HFFiles, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small-vocab"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32)).save_pretrained(small)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf.llama / name, small / name)
    result = invoke("calibrate", small, "--text", hf.calib, "--layers", "*.down_proj", "--sparsity", 0.5, "-o", tmp_path / "m.safetensors")
    one_line_error(result, 6, "vocabulary has 40 entries")


# --- a module:factory: keyword arguments, and a raw transformers model ------------------------

FACTORY = '''
import torch
from torch import nn


def build(hidden=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=32))
'''


def test_factory_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
    with user_module(tmp_path, FACTORY, monkeypatch) as name:
        result = invoke("inspect", f"{name}:build", "--data", data, "--factory-args", '{"hidden": 12}', "--json")
        assert result.exit_code == 0, result.output
        shapes = {row["layer"]: row["input_shape"] for row in json.loads(result.stdout)["layers"]}
        assert shapes["2"] == [6, 12]
        for args, expected in (('{"hidden": 12', "not valid JSON"), ("[12]", "must be a JSON object"),
                               ('{"width": 3}', 'does not take --factory-args {"width": 3}')):
            result = invoke("inspect", f"{name}:build", "--data", data, "--factory-args", args)
            one_line_error(result, 4, expected)
        result = invoke("inspect", "digits-mlp", "--factory-args", "{}")
        one_line_error(result, 4, "package.module:factory")


def test_factory_returning_a_transformers_model_gives_named_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse_deploy.models.loading import load_model

    with user_module(tmp_path, FACTORY, monkeypatch) as name:
        loaded = load_model(f"{name}:llama")
    ids = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        out = loaded.module(input_ids=ids)
    assert list(out) == ["logits"] and tuple(out["logits"].shape) == (2, 5, 32)  # no DynamicCache
    assert loaded.io_spec({"input_ids": ids}).input_names == ("input_ids",)
    assert "model.layers.0.mlp.down_proj" in dict(loaded.module.named_modules())  # Hugging Face names kept


def test_default_recipe_keeps_its_gram_statistics_within_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """obs + lstsq where the Gram matrices fit DEFAULT_GRAM_BYTES (two 128-wide
    down projections: 2 x 129^2 x 8 bytes), the summed-activation score beyond."""
    from actsparse_deploy.calibration.recipe import Recipe
    from actsparse_deploy.models import hf as hf_module

    model = _llama(32)
    layers = Recipe.coerce(hf_module.default_recipe(model)).select(model)
    assert sorted(layers) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert {(c.method.name if c.method else None, c.compensate) for c in layers.values()} == {("obs", "lstsq")}
    monkeypatch.setattr(hf_module, "DEFAULT_GRAM_BYTES", 2 * 129**2 * 8 - 1)
    layers = Recipe.coerce(hf_module.default_recipe(model)).select(model)
    assert {(c.method, c.compensate, c.aggregate_fn.name) for c in layers.values()} == {(None, "none", "sum_abs")}


EVIL = """
import pathlib
pathlib.Path(__file__).with_name("PWNED").touch()
"""


def _copy(hf: HFFiles, tmp_path: Path, name: str) -> Path:
    directory = tmp_path / name
    shutil.copytree(hf.llama, directory)
    (directory / "evil.py").write_text(EVIL)
    return directory


def test_a_directory_that_names_its_own_code_is_refused_unrun(hf: HFFiles, tmp_path: Path) -> None:
    """auto_map in config.json / tokenizer_config.json would have transformers
    import the directory's Python (after a prompt on stdout): refused first."""
    model = _copy(hf, tmp_path, "automap")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    result = invoke("inspect", model, "--json")
    one_line_error(result, 4, "auto_map")
    assert result.stdout == ""
    tokenizer = _copy(hf, tmp_path, "tokmap")
    tok_config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(tok_config))
    result = invoke("calibrate", tokenizer, "--text", hf.calib, "-o", tmp_path / "m.safetensors")
    one_line_error(result, 6, "auto_map")
    assert not (model / "PWNED").exists() and not (tokenizer / "PWNED").exists() and not (tmp_path / "m.safetensors").exists()


def test_broken_weights_and_tokenizers_are_one_line_with_their_codes(hf: HFFiles, tmp_path: Path) -> None:
    truncated = _copy(hf, tmp_path, "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:5000])
    assert invoke("inspect", truncated).exit_code == 5
    badtok = _copy(hf, tmp_path, "badtok")
    tok = json.loads((badtok / "tokenizer.json").read_text())
    tok["model"]["type"] = "Nope"
    (badtok / "tokenizer.json").write_text(json.dumps(tok))
    result = invoke("calibrate", badtok, "--text", hf.calib, "-o", tmp_path / "m.safetensors")
    one_line_error(result, 6, "tokenizer")
    result = invoke("calibrate", hf.llama, "--task", "feature-extraction", "--text", hf.calib, "-o", tmp_path / "fe.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert "LOAD REPORT" not in result.stderr and "\x1b" not in result.stderr  # transformers' report stays quiet


def test_a_directory_converts_with_its_layers_named(hf: HFFiles, tmp_path: Path) -> None:
    """`--layers` on a model directory: a one-rule recipe, never a built-in's (the directory is none)."""
    result = invoke("convert", hf.llama, "--task", "causal-lm", "--text", hf.calib, "--heldout-text", hf.held,
                    "--layers", "model.layers.0.mlp.down_proj", "--sparsity", "0.25", "-o", tmp_path / "out", "--json", "--no-latency",
                    "--no-cache")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["layer"] for row in report["layers"]] == ["model.layers.0.mlp.down_proj"]
    assert report["layers"][0]["sparsity"] == pytest.approx(0.25, abs=0.05)
