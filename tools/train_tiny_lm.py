"""Train the built-in ``tiny-lm`` and its tokenizer, deterministically, on CPU.

    nice -n 10 env OMP_NUM_THREADS=1 python tools/train_tiny_lm.py

writes ``models/tiny-lm-tokenizer.json`` (a byte-level BPE of 4096 tokens trained
with ``tokenizers`` on the training topics of ``pydoc_data.topics``) and
``models/tiny-lm.safetensors`` (the weights of ``actsparse_deploy.models.tinylm``'s
Llama, float16, the tied output layer left out), then prints the held-out
perplexity of the saved weights loaded back as float32 (the figure for
``tinylm.HELDOUT_PERPLEXITY``) beside a unigram model's (token frequencies of the
training text, add-one smoothed) on the same tokens. The figures are also stored in
the weights file's metadata. The text splits, token rows and the perplexity are
those of the library (``tinylm.tiny_lm_batches``, ``metrics.perplexity``).

Training: AdamW, batches of 16 random windows of 128 tokens of the training
stream, linear warm-up then cosine decay, one CPU thread, fixed seeds: the same
machine and library versions give the same bytes. About 10 minutes of one core.
``--eval-every N`` prints the calibration perplexity every N steps (the held-out
data is only looked at once, at the end).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actsparse_deploy.models import tinylm  # noqa: E402
from actsparse_deploy.onnx.metrics import perplexity  # noqa: E402

SEED = 20240607
BATCH, WINDOW = 16, 128
LR, MIN_LR_FRACTION, WARMUP, WEIGHT_DECAY, CLIP = 2e-3, 0.1, 50, 0.1, 1.0


def train_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tinylm.CONFIG["vocab_size"],
        min_frequency=2,
        special_tokens=[tinylm.EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tinylm.split_texts("train"), trainer)
    tokenizer.save(str(path))


def learning_rate(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def unigram_perplexity(train: torch.Tensor, batches: list[dict[str, torch.Tensor]]) -> float:
    counts = torch.bincount(train, minlength=tinylm.CONFIG["vocab_size"]).double() + 1.0
    log_p = (counts / counts.sum()).log()
    targets = torch.cat([b["input_ids"][:, 1:].reshape(-1) for b in batches])
    return float(torch.exp(-log_p[targets].mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--out", type=Path, default=ROOT / "models")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = args.out / tinylm.TOKENIZER_FILENAME
    weights_path = args.out / tinylm.WEIGHTS_FILENAME

    start = time.process_time()
    train_tokenizer(tokenizer_path)
    stream = tinylm.token_stream("train", tokenizer_path)
    calibration = tinylm.tiny_lm_batches("calibration", 16, tokenizer_path)
    print(f"tokenizer: {tokenizer_path} ({tokenizer_path.stat().st_size} bytes); train stream {len(stream)} tokens")

    model = tinylm.build_tiny_lm()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params} parameters")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(SEED)
    offsets = torch.arange(WINDOW)
    for step in range(args.steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps)
        starts = torch.randint(0, len(stream) - WINDOW, (BATCH,), generator=generator)
        ids = stream[starts[:, None] + offsets]
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.process_time() - start:.0f} s CPU)", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            print(f"  calibration perplexity {perplexity(model, calibration):.3f}", flush=True)
    seconds = time.process_time() - start

    from safetensors.torch import save_file

    state = {k.removeprefix("lm."): v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    del state["lm_head.weight"]  # tied to model.embed_tokens.weight
    heldout = tinylm.tiny_lm_batches("heldout", 8, tokenizer_path)
    saved = {"steps": str(args.steps), "seed": str(SEED), "parameters": str(params), "train_cpu_seconds": f"{seconds:.0f}"}
    save_file(state, str(weights_path), metadata=saved)
    loaded = tinylm.load_tiny_lm(weights_path)
    figures = {
        "heldout_perplexity": perplexity(loaded, heldout),
        "calibration_perplexity": perplexity(loaded, calibration),
        "unigram_heldout_perplexity": unigram_perplexity(stream, heldout),
        "float32_heldout_perplexity": perplexity(model, heldout),
    }
    save_file(state, str(weights_path), metadata={**saved, **{k: f"{v:.6f}" for k, v in figures.items()}})
    print(f"weights: {weights_path} ({weights_path.stat().st_size} bytes), {seconds:.0f} s CPU for {args.steps} steps")
    for key, value in figures.items():
        print(f"{key}: {value:.4f}")


if __name__ == "__main__":
    main()
