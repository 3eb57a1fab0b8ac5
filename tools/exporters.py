"""Which torch.onnx exporter works on which model family: the table behind
``DEFAULT_EXPORTER`` and ``export.AUTO_ORDER``.

Each model is exported with each exporter (``export_onnx``: names and dynamic
axes from the model and its data) and validated under onnxruntime (several
batch sizes, and two sequence lengths for sequence models). A row says whether
that worked, why not (the first line of the error), the export seconds, and the
declared ONNX input shapes. The Hugging Face models are random-init, built from
small configs (no download).

    OMP_NUM_THREADS=1 python tools/exporters.py            # every model
    OMP_NUM_THREADS=1 python tools/exporters.py llama-mask gpt2-ids --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from actsparse_deploy.base.errors import ActsparseError, first_line
from actsparse_deploy.onnx.export import AUTO_ORDER, export_onnx
from actsparse_deploy.onnx.validate import validate

EXPORTERS = ("torchscript", "dynamo", "auto")
SEQ, VOCAB = 16, 256


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, use_cache=False)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


class Logits(nn.Module):
    """A user's wrapper: ``forward(input_ids, attention_mask)`` -> ``{"logits": ...}``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits}


class DepthwiseCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pointwise(torch.relu(self.depthwise(torch.relu(self.stem(image))))))
        return self.head(x.mean(dim=(2, 3)))


def _tokens(samples: int, seq: int = SEQ, mask: bool = True) -> Any:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (samples, seq), generator=generator)
    if not mask:
        return ids
    attention = torch.ones(samples, seq, dtype=torch.int64)
    attention[::2, seq - 3:] = 0  # right padding on every other sample
    return {"input_ids": ids, "attention_mask": attention}


def _builtin(name: str) -> Callable[[], tuple[nn.Module, Any, list[Any], Any]]:
    def make() -> tuple[nn.Module, Any, list[Any], Any]:
        from actsparse_deploy.app.workload import load_workload

        work = load_workload(name)
        return work.model, work.example(), work.require_heldout()[:2], work.io

    return make


def _hf(lm: Callable[[], nn.Module], mask: bool) -> Callable[[], tuple[nn.Module, Any, list[Any], Any]]:
    def make() -> tuple[nn.Module, Any, list[Any], Any]:
        model = Logits(lm()) if mask else lm()
        held = [_tokens(10, mask=mask)]
        example = {k: v[:2] for k, v in held[0].items()} if mask else held[0][:2]
        return model, example, held, None

    return make


def _depthwise() -> tuple[nn.Module, Any, list[Any], Any]:
    torch.manual_seed(0)
    held = [torch.randn(10, 3, 12, 12)]
    return DepthwiseCNN().eval(), held[0][:2], held, None


MODELS: dict[str, Callable[[], tuple[nn.Module, Any, list[Any], Any]]] = {
    "digits-mlp": _builtin("digits-mlp"),
    "digits-cnn": _builtin("digits-cnn"),
    "minilm": _builtin("minilm"),
    "llama-mask": _hf(_llama, mask=True),
    "llama-ids": _hf(_llama, mask=False),
    "gpt2-mask": _hf(_gpt2, mask=True),
    "gpt2-ids": _hf(_gpt2, mask=False),
    "depthwise-cnn": _depthwise,
}


def _declared_inputs(path: Path) -> str:
    proto = onnx.load(str(path), load_external_data=False)
    return "; ".join(
        f"{v.name} [{', '.join(d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim)}]" for v in proto.graph.input
    )


def measure(name: str, exporter: str) -> dict[str, Any]:
    model, example, held, io = MODELS[name]()
    row: dict[str, Any] = {"model": name, "exporter": exporter}
    fell_back: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        try:
            result = export_onnx(model, example, path, exporter=exporter, io_spec=io, data=held, on_fallback=fell_back.append)
        except ActsparseError as e:
            return {**row, "works": False, "reason": first_line(e)[:160], "seconds": round(time.perf_counter() - start, 2)}
        row.update(seconds=round(result.seconds, 2), used=result.exporter, inputs=_declared_inputs(path))
        if fell_back:
            row["fallback"] = fell_back[0][:160]
        try:
            report = validate(path, model, held, io_spec=result.io)
        except ActsparseError as e:
            return {**row, "works": False, "reason": "validation: " + first_line(e)[:160]}
        lengths = ", ".join(f"{k} {v}" for k, v in report.sequence_lengths.items())
        return {**row, "works": True, "reason": f"validated at batch sizes {report.batch_sizes}" + (f", {lengths}" if lengths else "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(MODELS), help=f"default: all of {', '.join(MODELS)}")
    parser.add_argument("--exporters", nargs="*", default=list(EXPORTERS))
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        for exporter in args.exporters:
            row = measure(name, exporter)
            rows.append(row)
            print(f"{name} / {exporter}: {'works' if row['works'] else 'FAILS'}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"auto tries {' then '.join(AUTO_ORDER)}\n")
    print("| model | exporter | works | export s | ONNX inputs | reason |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        exporter = r["exporter"] + (f" -> {r['used']}" if r["exporter"] == "auto" and "used" in r else "")
        print(f"| {r['model']} | {exporter} | {'yes' if r['works'] else 'no'} | {r.get('seconds', '')} | {r.get('inputs', '')} "
              f"| {r['reason']} |")


if __name__ == "__main__":
    main()
