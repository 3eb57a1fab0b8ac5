"""A 1.1 B-parameter Llama decoder end to end on this machine: bfloat16 weights, cache export, 25 % of the MLP features.

Builds (a fixed seed, nothing downloaded) a Llama-architecture causal LM with
TinyLlama's shape by default (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 KV heads, vocabulary 32000: 1.10 B parameters), random weights saved in bfloat16
with ``save_pretrained``, a byte-level BPE tokenizer trained on the standard
library's docstrings, and calibration / held-out text from those docstrings (other
modules for each). Then runs ``actsparse convert DIR --task causal-lm`` (the decoder
with its KV cache in float16, 25 % of the MLP features pruned, validation with the
generation check, the cost, the latency and decode speed against the dense export)
in a child process under ``tools/measure_stage_memory.py``: wall time, peak RSS per
stage and over the weights, and the report's figures. ``--calibrate``: ``actsparse
calibrate`` instead (with ``--max-memory`` under the weights: block by block). Not part
of the test suite.

    OMP_NUM_THREADS=2 python tools/measure_big_decoder.py --workdir /tmp/llama1b --json llama1b.json
    OMP_NUM_THREADS=2 python tools/measure_big_decoder.py --workdir /tmp/llama1b --calibrate --extra '--max-memory 1.5GB'  # block by block
    python tools/measure_big_decoder.py --workdir /tmp/llama-small --layers 2 --hidden 256 --intermediate 704   # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: standard-library modules whose docstrings make the text (calibration from the first, held-out from the second)
CALIBRATION_MODULES = ("collections", "functools", "itertools", "pathlib", "json", "argparse", "subprocess", "textwrap")
HELDOUT_MODULES = ("statistics", "fractions", "decimal", "calendar")


def docstring_lines(modules: tuple[str, ...], limit: int) -> list[str]:
    """Paragraphs of the docstrings of ``modules`` and their members, one line each (at most ``limit``)."""
    import importlib
    import inspect

    lines: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        for obj in [module, *(getattr(module, n) for n in sorted(dir(module)) if not n.startswith("_"))]:
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj)) else None
            for paragraph in (doc or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if len(text.split()) >= 8 and text not in lines:
                    lines.append(text)
    return lines[:limit]


def build(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The model directory (weights in bfloat16, tokenizer) and the two text files; their sizes."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = workdir / "model"
    calibration, heldout = docstring_lines(CALIBRATION_MODULES, args.calibration), docstring_lines(HELDOUT_MODULES, args.heldout)
    (workdir / "calib.txt").write_text("\n".join(calibration) + "\n")
    (workdir / "held.txt").write_text("\n".join(heldout) + "\n")
    if not (directory / "config.json").exists():
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(docstring_lines(CALIBRATION_MODULES + HELDOUT_MODULES, 100000), trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                             max_position_embeddings=2048, tie_word_embeddings=False)
        torch.manual_seed(args.seed)
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bfloat16: never a float32 copy of 1 B parameters
        try:
            model = LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(before)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        del model
    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return {"weights_bytes": weights, "calibration_lines": len(calibration), "heldout_lines": len(heldout)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the model, text and outputs go (~3x the weights on disk)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--calibration", type=int, default=32, help="calibration text lines")
    parser.add_argument("--heldout", type=int, default=16, help="held-out text lines")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per line at most")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", default="", help="more convert flags, one string (e.g. '--no-latency')")
    parser.add_argument("--calibrate", action="store_true", help="run `actsparse calibrate` (the masks only) instead of convert")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    built = build(args.workdir, args)
    built["build_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(built), file=sys.stderr, flush=True)
    stage = (["calibrate", str(args.workdir / "model"), "-o", str(args.workdir / "masks.safetensors")] if args.calibrate else
             ["convert", str(args.workdir / "model"), "--heldout-text", str(args.workdir / "held.txt"), "-o", str(args.workdir / "out")])
    command = [sys.executable, str(HERE / "measure_stage_memory.py"), "--weights-bytes", str(built["weights_bytes"]), "--", *stage,
               "--task", "causal-lm", "--text", str(args.workdir / "calib.txt"), "--max-length", str(args.max_length), "--sparsity",
               str(args.sparsity), "--overwrite", "--json", *args.extra.split()]
    print(" ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
        return done.returncode
    measured = json.loads(done.stdout)
    report = measured.pop("report", {}) or {}
    result = {**built, **measured, "seconds": report.get("seconds"), "cost": {k: v for k, v in (report.get("cost") or {}).items()
                                                                              if k.startswith("perplexity")},
              "latency": report.get("latency"), "export": {k: (report.get("export") or {}).get(k) for k in ("dtype", "source_dtype", "cache", "size_bytes")},
              "validation": {k: (report.get("validation") or {}).get(k) for k in ("passed", "max_abs_diff", "atol", "rtol")},
              "sparsity": report.get("overall_sparsity"), "memory": report.get("memory")}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
