"""Measure what a decoder with a KV cache generates at: dense vs converted, both with their cache.

Runs the real command on each model and reads ``report.json``'s ``latency.decode``
(onnxruntime, batch 1, a held-out prompt, 64 new tokens, ms per new token, the two
models alternated, median) and ``validation.generation`` (greedy tokens identical to
PyTorch's):

- ``tiny-lm`` (the built-in, its own recipe at each ``--levels`` sparsity);
- a Llama-architecture directory with random weights (``save_pretrained``, tiny-lm's
  tokenizer and texts) at a size where the MLP dominates decode time
  (``--hidden 512 --intermediate 2048``), the default recipe (``down_proj`` inputs) at
  each level.

Prints a Markdown table (the README's) and, with ``--json``, writes the rows.

    python tools/measure_decode.py                      # 1 thread
    python tools/measure_decode.py --levels 0.5 --hidden 512 --intermediate 2048 --json decode.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def llama_directory(root: Path, hidden: int, intermediate: int, layers: int) -> tuple[Path, Path, Path]:
    """A random-init Llama directory with tiny-lm's tokenizer, and calibration / held-out text files of tiny-lm's splits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from actsparse_deploy.base.constants import models_dir
    from actsparse_deploy.models.tinylm import CONFIG, EOS_TOKEN, TOKENIZER_FILENAME, split_texts

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=CONFIG["vocab_size"], hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    directory = root / f"llama-{hidden}-{intermediate}"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(models_dir() / TOKENIZER_FILENAME), eos_token=EOS_TOKEN,
                                        bos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    tokenizer.save_pretrained(directory)
    texts = {}
    for split, count in (("calibration", 64), ("heldout", 24)):
        lines = [" ".join(t.split())[:600] for t in split_texts(split) if t.strip()][:count]
        texts[split] = root / f"{split}.txt"
        texts[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory, texts["calibration"], texts["heldout"]


def convert(model: str, extra: list[str], threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "actsparse_deploy", "convert", model, "-o", str(out), "--json", "--threads", str(threads),
                   *extra]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"convert {model} failed ({proc.returncode}): {proc.stderr.strip()}")
        return json.loads((out / "report.json").read_text())


def row(name: str, level: float, report: dict[str, Any]) -> dict[str, Any]:
    decode, generation = report["latency"]["decode"], report["validation"]["generation"]
    cost = report["cost"]
    return {
        "model": name, "sparsity": level, "overall_sparsity": report["overall_sparsity"],
        "dense_ms_per_token": decode["dense_ms_per_token"], "sparse_ms_per_token": decode["sparse_ms_per_token"],
        "decode_ratio": decode["ratio"], "full_pass_ratio": report["latency"]["ratio"],
        "prompt_tokens": decode["prompt_tokens"], "new_tokens": decode["new_tokens"], "threads": decode["threads"],
        "tokens_identical": generation["tokens_identical"], "generation_max_abs_diff": generation["max_abs_diff"],
        "perplexity_ratio": cost["perplexity_sparse"] / cost["perplexity_dense"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-tiny-lm", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory, calib, held = llama_directory(Path(tmp), args.hidden, args.intermediate, args.layers)
        for level in args.levels:
            if not args.skip_tiny_lm:
                rows.append(row("tiny-lm", level, convert("tiny-lm", ["--sparsity", str(level)], args.threads)))
            extra = ["--task", "causal-lm", "--text", str(calib), "--heldout-text", str(held), "--sparsity", str(level)]
            name = f"Llama {args.hidden}/{args.intermediate} x{args.layers} (random)"
            rows.append(row(name, level, convert(str(directory), extra, args.threads)))
    print("| model | sparsity | decode ms/token dense -> converted | decode ratio | full-pass ratio | 32+ greedy tokens | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sparsity']:.0%} | {r['dense_ms_per_token']:.3g} -> {r['sparse_ms_per_token']:.3g} | "
              f"{r['decode_ratio']:.2f}x | {r['full_pass_ratio']:.2f}x | "
              f"{'identical' if r['tokens_identical'] else 'DIFFERENT'} | x{r['perplexity_ratio']:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
