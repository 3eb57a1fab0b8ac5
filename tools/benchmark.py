"""The benchmark suite: calibration cost, deployed speed, accuracy cost, export time.

Method: a fixed thread count (torch and onnxruntime), warm-up runs, then at least
15 timed runs per variant; variants are alternated in one process (round robin,
the order rotated every round) so drift cancels; medians with min and max.

1. Calibration cost: `calibrate()` over the same batches vs plain forward passes,
   and vs torch's upstream `ActivationSparsifier` set up with equivalent
   functions (max |x| aggregate, per-feature reduce, top-k mask), with each
   variant's peak memory (extra RSS over the loaded model, measured in a fresh
   process) and the sparsifier's aggregate bytes. MiniLM: 8 batches of 8 x 128
   tokens, the six MLP `output.dense` inputs; digits CNN: its calibration split.
2. Deployed speed: onnxruntime latency of the dense export vs the `mul`, `fold`
   and `prune` squashes at 25 / 50 / 75% of the MiniLM MLP hidden features, at
   1 x 128 and 8 x 128 tokens, with the ideal alongside (the same encoder built
   directly at the smaller hidden size); the digits models at their recipes.
3. The accuracy cost next to every speed figure: sentence-embedding cosine
   similarity to the dense model on the held-out sentences (mean and worst),
   digits test accuracy.
4. Export and validation time per exporter.
5. Model families (``--sections families``): onnxruntime latency of a Llama MLP
   stack (RMSNorm + SwiGLU ``LlamaMLP`` blocks with residuals, hidden 256,
   intermediate 1024, 4 blocks, 8 x 64 tokens) with 50 % of each ``down_proj``'s
   inputs masked: dense, mul, fold, prune, auto, and the same stack built at
   intermediate 512 (the ideal); GPT-2 (``GPT2LMHeadModel``, 256 wide, 4 layers,
   ``mlp.c_proj`` inputs 50 % masked, dynamo exporter) and a depthwise-separable
   CNN (pointwise convs' inputs 50 % masked, 8 x 3 x 32 x 32): dense, mul, fold,
   prune, auto. Random weights and masks: latency only.

    python tools/benchmark.py                         # everything (~10 min on 2 cores), out/benchmark.json
    python tools/benchmark.py --sections calibration  # one section
    python tools/benchmark.py --quick                 # few runs: checks the script, not the figures
    python tools/benchmark.py --sections families     # Llama MLP / GPT-2 / depthwise CNN, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

THREADS = 1
torch.set_num_threads(THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from actsparse_deploy import ActivationSparsifier, Recipe, calibrate, squash  # noqa: E402
from actsparse_deploy.app.workload import load_workload  # noqa: E402
from actsparse_deploy.calibration.functions import MASK_FNS  # noqa: E402
from actsparse_deploy.data.batches import resize_batches  # noqa: E402
from actsparse_deploy.models.loading import load_recipe  # noqa: E402
from actsparse_deploy.onnx.export import export_onnx  # noqa: E402
from actsparse_deploy.onnx.latency import alternate, ort_session  # noqa: E402
from actsparse_deploy.onnx.metrics import accuracy, cosine_stats  # noqa: E402
from actsparse_deploy.onnx.validate import validate  # noqa: E402

MINILM_LAYERS = [f"bert.encoder.layer.{i}.output.dense" for i in range(6)]
LEVELS = (0.25, 0.5, 0.75)


# --- timing: actsparse_deploy.onnx.latency (alternate, ort_session) -------------------------


# --- 1. calibration cost ---------------------------------------------------------------


def minilm_calibration_batches() -> list[dict[str, torch.Tensor]]:
    from actsparse_deploy.models.minilm import fixed_length_batches

    # a split holds 5 such batches; 8 come from both (timing only: no mask is kept)
    return fixed_length_batches("calibration", 5, 8, 128) + fixed_length_batches("heldout", 3, 8, 128)


def _forward_all(model: torch.nn.Module, batches: list[Any]) -> None:
    with torch.no_grad():
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)


def upstream_sparsifier(model: torch.nn.Module, layers: list[str], level: float) -> Any:
    """torch's own sparsifier, registered with functions equivalent to our
    max_abs / feature_mean / topk (upstream keeps a whole batch-shaped aggregate)."""
    from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import (
        ActivationSparsifier as Upstream,
    )

    topk = MASK_FNS.get("topk")

    def agg(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(a, x.abs())

    def reduce_linear(d: torch.Tensor) -> torch.Tensor:
        return d.amax(dim=tuple(range(d.ndim - 1)))

    def reduce_conv(d: torch.Tensor) -> torch.Tensor:
        return d.amax(dim=0).mean(dim=(1, 2), keepdim=True)

    def mask(d: torch.Tensor, sparsity_level: float) -> torch.Tensor:
        return topk(d, sparsity_level=sparsity_level)

    sp = Upstream(model, aggregate_fn=agg, mask_fn=mask, sparsity_level=level)
    for name in layers:
        layer = model.get_submodule(name)
        sp.register_layer(layer, reduce_fn=reduce_conv if isinstance(layer, torch.nn.Conv2d) else reduce_linear)
    return sp


def upstream_calibrate(model: torch.nn.Module, layers: list[str], batches: list[Any], level: float) -> None:
    sp = upstream_sparsifier(model, layers, level)
    _forward_all(model, batches)
    sp.step()
    for name in layers:
        sp.unregister_layer(name)


def calibration_setups(model_name: str) -> tuple[torch.nn.Module, list[Any], Recipe, list[str]]:
    """Model, batches, recipe and layers; every batch the same size, which upstream needs."""
    if model_name == "minilm":
        work = load_workload(model_name)
        return work.model, minilm_calibration_batches(), load_recipe(work, None), MINILM_LAYERS
    work = load_workload(model_name, batch_size=40)  # 200 calibration images: 5 x 40
    recipe = load_recipe(work, None)
    return work.model, list(work.calibration), recipe, list(recipe.select(work.model))


def calibration_section(model_name: str, warmup: int, runs: int) -> dict[str, Any]:
    model, batches, recipe, layers = calibration_setups(model_name)
    level = 0.25
    timings = alternate(
        {
            "plain_forward": lambda: _forward_all(model, batches),
            "ours": lambda: calibrate(model, recipe, batches),
            "upstream": lambda: upstream_calibrate(model, layers, batches, level),
        },
        warmup,
        runs,
    )
    plain = timings["plain_forward"]["median_ms"]
    memory = {variant: memory_probe(model_name, variant) for variant in ("plain_forward", "ours", "upstream")}
    return {
        "model": model_name,
        "batches": [list(next(iter(b.values())).shape) if isinstance(b, dict) else list(b.shape) for b in batches[:1]] + [len(batches)],
        "layers": layers,
        "timings": timings,
        "ratio_ours": timings["ours"]["median_ms"] / plain,
        "ratio_upstream": timings["upstream"]["median_ms"] / plain,
        "memory": memory,
    }


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_probe(model_name: str, variant: str) -> dict[str, float]:
    """Peak extra RSS of one variant, in a fresh process (after loading model and data)."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", model_name, variant], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_memory_probe(model_name: str, variant: str) -> None:
    model, batches, recipe, layers = calibration_setups(model_name)
    _forward_all(model, batches[:1])  # allocator warm
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
    base = _rss_kb("VmRSS")
    state_bytes = 0
    if variant == "plain_forward":
        _forward_all(model, batches)
    elif variant == "ours":
        sp = ActivationSparsifier(model)
        for name, config in recipe.select(model).items():
            sp.register_layer(model.get_submodule(name), **config.register_kwargs())
        _forward_all(model, batches)
        state_bytes = sum(c["data"].value.nbytes for c in sp.data_groups.values())
        sp.step()
    else:
        sp = upstream_sparsifier(model, layers, 0.25)
        _forward_all(model, batches)
        state_bytes = sum(c["data"].nbytes + sp.state[n]["mask"].nbytes for n, c in sp.data_groups.items())
        sp.step()
    peak = _rss_kb("VmHWM")
    print(json.dumps({"peak_extra_mb": round((peak - base) / 1024, 1), "aggregate_mb": round(state_bytes / 2**20, 3)}))


# --- 2/3. deployed speed and accuracy cost ------------------------------------------------


def ideal_minilm(hidden: int) -> torch.nn.Module:
    """The MiniLM encoder built directly with MLP hidden size ``hidden`` (random weights: latency only)."""
    from transformers import BertConfig, BertModel

    from actsparse_deploy.models.minilm import MiniLMEncoder, model_dir

    config = BertConfig.from_pretrained(str(model_dir()), local_files_only=True)
    config.intermediate_size = hidden
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    bert = BertModel(config, add_pooling_layer=False)
    return MiniLMEncoder(bert).eval()


def speed_section_minilm(tmp: Path, warmup: int, runs: int, levels: tuple[float, ...]) -> dict[str, Any]:
    from actsparse_deploy.models.minilm import fixed_length_batches

    work = load_workload("minilm")
    inputs = {"1x128": fixed_length_batches("heldout", 1, 1, 128)[0], "8x128": fixed_length_batches("heldout", 1, 8, 128)[0]}
    paths: dict[str, Path] = {"dense": tmp / "dense.onnx"}
    export_onnx(work.model, work.example(), paths["dense"], io_spec=work.io)
    cost: dict[str, Any] = {}
    for level in levels:
        masks = calibrate(work.model, load_recipe(work, None, level), work.calibration)
        for mode in ("mul", "fold", "prune"):
            result = squash(work.model, masks, mode, example=work.example())
            paths[f"{mode}@{level}"] = tmp / f"{mode}-{level}.onnx"
            export_onnx(result.model, work.example(), paths[f"{mode}@{level}"], io_spec=work.io)
            if mode == "prune":
                sentence = {r["output"]: r for r in _named(cosine_stats(work.model, result.model, work.heldout), work)}
                cost[str(level)] = {
                    "cosine_mean": sentence["sentence_embedding"]["cosine_mean"],
                    "cosine_min": sentence["sentence_embedding"]["cosine_min"],
                    "intermediate_size": result.model.bert.encoder.layer[0].intermediate.dense.out_features,
                }
        hidden = result.model.bert.encoder.layer[0].intermediate.dense.out_features
        paths[f"ideal@{level}"] = tmp / f"ideal-{level}.onnx"
        export_onnx(ideal_minilm(hidden), work.example(), paths[f"ideal@{level}"], io_spec=work.io)
    sessions = {name: ort_session(p) for name, p in paths.items()}
    results: dict[str, Any] = {}
    for shape, batch in inputs.items():
        feeds = {k: v.numpy() for k, v in batch.items()}
        timings = alternate({name: (lambda s=s, feeds=feeds: s.run(None, feeds)) for name, s in sessions.items()}, warmup, runs)
        dense = timings["dense"]["median_ms"]
        rows = {}
        for name, t in timings.items():
            row = {**t, "vs_dense": t["median_ms"] / dense}
            if name.startswith("prune@"):
                row["vs_ideal"] = t["median_ms"] / timings["ideal@" + name.split("@")[1]]["median_ms"]
            rows[name] = row
        results[shape] = rows
    return {"model": "minilm", "latency": results, "cost": cost}


def _named(rows: list[dict[str, Any]], work: Any) -> list[dict[str, Any]]:
    for row in rows:
        if isinstance(row["output"], int):
            row["output"] = work.io.output_names[row["output"]]
    return rows


def speed_section_digits(name: str, tmp: Path, warmup: int, runs: int) -> dict[str, Any]:
    work = load_workload(name)
    masks = calibrate(work.model, load_recipe(work, None), work.calibration)
    models = {"dense": work.model}
    for mode in ("mul", "fold", "prune", "auto"):
        models[mode] = squash(work.model, masks, mode, example=work.example()).model
    sessions = {}
    for variant, model in models.items():
        path = tmp / f"{name}-{variant}.onnx"
        export_onnx(model, work.example(), path, io_spec=work.io)
        sessions[variant] = ort_session(path)
    held = work.heldout
    results = {}
    for size in (1, 32):
        feeds = {"input": resize_batches(held, size, size)[0].numpy()}
        timings = alternate({v: (lambda s=s, feeds=feeds: s.run(None, feeds)) for v, s in sessions.items()}, warmup, runs * 5)
        dense = timings["dense"]["median_ms"]
        results[f"batch{size}"] = {v: {**t, "vs_dense": t["median_ms"] / dense} for v, t in timings.items()}
    acc = {variant: accuracy(model, held, work.labels) for variant, model in models.items()}
    return {"model": name, "latency": results, "accuracy": acc}


# --- 4. export and validation time --------------------------------------------------------


def export_section(tmp: Path, runs: int) -> list[dict[str, Any]]:
    rows = []
    for name in ("digits-cnn", "minilm"):
        work = load_workload(name)
        masks = calibrate(work.model, load_recipe(work, None), work.calibration)
        model = squash(work.model, masks, "auto", example=work.example()).model
        for exporter in ("torchscript", "dynamo"):
            exports, validations, diffs = [], [], []
            for i in range(runs):
                path = tmp / f"x-{name}-{exporter}-{i}.onnx"
                result = export_onnx(model, work.example(), path, exporter=exporter, io_spec=work.io)
                exports.append(result.seconds)
                start = time.perf_counter()
                diffs.append(validate(path, model, work.heldout).max_abs)
                validations.append(time.perf_counter() - start)
            rows.append({
                "model": name, "exporter": exporter, "export_s_median": statistics.median(exports),
                "validate_s_median": statistics.median(validations), "ort_max_abs_diff": max(diffs), "runs": runs,
            })
    return rows


# --- 5. model families: SwiGLU, Conv1D, depthwise ------------------------------------------


class LlamaMLPStack(torch.nn.Module):
    """Llama decoder blocks without attention: ``x + mlp(norm(x))`` per block (transformers' LlamaMLP / LlamaRMSNorm)."""

    def __init__(self, hidden: int = 256, intermediate: int = 1024, blocks: int = 4) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        super().__init__()
        config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate)
        self.norms = torch.nn.ModuleList(LlamaRMSNorm(hidden) for _ in range(blocks))
        self.mlps = torch.nn.ModuleList(LlamaMLP(config) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, mlp in zip(self.norms, self.mlps, strict=True):
            x = x + mlp(norm(x))
        return x


class GPT2Logits(torch.nn.Module):
    def __init__(self) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        super().__init__()
        config = GPT2Config(vocab_size=256, n_embd=256, n_layer=4, n_head=4, n_positions=128, use_cache=False)
        config.bos_token_id = config.eos_token_id = 0
        self.lm = GPT2LMHeadModel(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


class DepthwiseCNN(torch.nn.Module):
    """MobileNet-style: stem, then (depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU) blocks, pool, fc."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 128)) -> None:
        from torch import nn

        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks = []
        for a, b in zip(widths, widths[1:], strict=False):
            blocks.append(nn.Sequential(
                nn.Conv2d(a, a, 3, padding=1, groups=a), nn.BatchNorm2d(a), nn.ReLU(),
                nn.Conv2d(a, b, 1), nn.BatchNorm2d(b), nn.ReLU(),
            ))
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def _half_masks(model: torch.nn.Module, layers: list[str], shape: tuple[int, ...] = ()) -> Any:
    """Half of each layer's input features masked, at random (seeded); latency only."""
    from actsparse_deploy.calibration.masks import LayerMask, Masks
    from actsparse_deploy.nn.layers import layer_kind

    found = {}
    g = torch.Generator().manual_seed(0)
    for name in layers:
        layer = model.get_submodule(name)
        kind = layer_kind(layer)
        assert kind is not None, name
        n = kind.in_features(layer)
        values = torch.ones(n)
        values[torch.randperm(n, generator=g)[: n // 2]] = 0
        found[name] = LayerMask(values.reshape(n, *shape))
    return Masks(found)


def _family(
    name: str, model: torch.nn.Module, layers: list[str], shape: tuple[int, ...], example: torch.Tensor,
    exporter: str, tmp: Path, warmup: int, runs: int, ideal: torch.nn.Module | None = None,
) -> dict[str, Any]:
    masks = _half_masks(model, layers, shape)
    models = {"dense": model}
    modes: dict[str, Any] = {}
    for mode in ("mul", "fold", "prune", "auto"):
        result = squash(model, masks, mode, example=example)
        models[mode] = result.model
        modes[mode] = sorted(set(result.modes.values()))
    if ideal is not None:
        models["ideal"] = ideal
    sessions = {}
    for variant, m in models.items():
        path = tmp / f"{name}-{variant}.onnx"
        export_onnx(m, example, path, exporter=exporter)
        sessions[variant] = ort_session(path)
    feed_name = sessions["dense"].get_inputs()[0].name
    feeds = {feed_name: example.numpy()}
    timings = alternate({v: (lambda s=s: s.run(None, feeds)) for v, s in sessions.items()}, warmup, runs)
    dense = timings["dense"]["median_ms"]
    rows = {v: {**t, "vs_dense": t["median_ms"] / dense} for v, t in timings.items()}
    if ideal is not None:
        rows["prune"]["vs_ideal"] = timings["prune"]["median_ms"] / timings["ideal"]["median_ms"]
    return {
        "model": name, "exporter": exporter, "input": list(example.shape), "layers": layers,
        "modes": modes, "latency": rows,
    }


def families_section(tmp: Path, warmup: int, runs: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    llama = LlamaMLPStack().eval()
    torch.manual_seed(1)
    ideal = LlamaMLPStack(intermediate=512).eval()
    hidden = torch.randn(8, 64, 256, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    gpt2 = GPT2Logits().eval()
    tokens = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    cnn = DepthwiseCNN().eval()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cnn_layers = [f"blocks.{i}.3" for i in range(3)]
    return [
        _family("llama-mlp", llama, [f"mlps.{i}.down_proj" for i in range(4)], (), hidden, "torchscript", tmp, warmup, runs, ideal),
        _family("gpt2", gpt2, [f"lm.transformer.h.{i}.mlp.c_proj" for i in range(4)], (), tokens, "dynamo", tmp, warmup, runs),
        _family("depthwise-cnn", cnn, cnn_layers, (1, 1), images, "torchscript", tmp, warmup, runs * 3),
    ]


# --- report ---------------------------------------------------------------------------------


def print_tables(report: dict[str, Any]) -> None:
    print(f"# benchmark {report['date']}, {report['machine']}, threads {THREADS}")
    for section in report.get("calibration", []):
        t = section["timings"]
        print(f"\n## calibration cost: {section['model']} ({len(section['layers'])} layers)")
        print("| variant | median ms | min | max | / plain | peak extra MB | aggregate MB |")
        print("|---|---|---|---|---|---|---|")
        for variant in ("plain_forward", "ours", "upstream"):
            m = section["memory"][variant]
            ratio = t[variant]["median_ms"] / t["plain_forward"]["median_ms"]
            print(f"| {variant} | {t[variant]['median_ms']:.1f} | {t[variant]['min_ms']:.1f} | {t[variant]['max_ms']:.1f} | "
                  f"{ratio:.3f} | {m['peak_extra_mb']} | {m['aggregate_mb']} |")
    minilm = report.get("speed_minilm")
    if minilm:
        print("\n## onnxruntime latency, MiniLM (ms median [min-max]; x dense; x ideal; sentence cosine mean / worst)")
        print("| variant | 1x128 | 8x128 | cosine |")
        print("|---|---|---|---|")
        for name in minilm["latency"]["1x128"]:
            cells = []
            for shape in ("1x128", "8x128"):
                r = minilm["latency"][shape][name]
                cell = f"{r['median_ms']:.1f} [{r['min_ms']:.1f}-{r['max_ms']:.1f}] {r['vs_dense']:.3f}x"
                if "vs_ideal" in r:
                    cell += f" ({r['vs_ideal']:.3f}x ideal)"
                cells.append(cell)
            level = name.split("@")[1] if "@" in name else None
            c = minilm["cost"].get(level) if level else None
            cos = f"{c['cosine_mean']:.4f} / {c['cosine_min']:.4f}" if c and not name.startswith("ideal") else ("1 / 1" if name == "dense" else "-")
            print(f"| {name} | {cells[0]} | {cells[1]} | {cos} |")
    for digits in report.get("speed_digits", []):
        print(f"\n## onnxruntime latency, {digits['model']} (ms median; x dense; test accuracy)")
        print("| variant | batch 1 | batch 32 | accuracy |")
        print("|---|---|---|---|")
        for v in digits["latency"]["batch1"]:
            b1, b32 = digits["latency"]["batch1"][v], digits["latency"]["batch32"][v]
            print(f"| {v} | {b1['median_ms']:.3f} ({b1['vs_dense']:.3f}x) | {b32['median_ms']:.3f} ({b32['vs_dense']:.3f}x) | {digits['accuracy'][v]:.4f} |")
    for family in report.get("families", []):
        print(f"\n## onnxruntime latency, {family['model']} ({family['exporter']}, input {family['input']}; "
              f"50 % of {len(family['layers'])} layers' inputs masked)")
        print("| variant | modes | median ms [min-max] | x dense |")
        print("|---|---|---|---|")
        for v, r in family["latency"].items():
            extra = f" ({r['vs_ideal']:.3f}x ideal)" if "vs_ideal" in r else ""
            modes = ", ".join(family["modes"].get(v, [])) or "-"
            print(f"| {v} | {modes} | {r['median_ms']:.2f} [{r['min_ms']:.2f}-{r['max_ms']:.2f}] | {r['vs_dense']:.3f}x{extra} |")
    if report.get("export"):
        print("\n## export and validation time")
        print("| model | exporter | export s | validate s | ORT max abs diff |")
        print("|---|---|---|---|---|")
        for r in report["export"]:
            print(f"| {r['model']} | {r['exporter']} | {r['export_s_median']:.2f} | {r['validate_s_median']:.2f} | {r['ort_max_abs_diff']:.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="*", default=["calibration", "speed", "speed-digits", "export"])
    parser.add_argument("--out", type=Path, default=Path("out/benchmark.json"))
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 runs, 1 warm-up, one sparsity level: a smoke test")
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        run_memory_probe(*args.memory_probe)
        return
    runs, warmup, levels = (2, 1, (0.5,)) if args.quick else (max(args.runs, 15), args.warmup, LEVELS)
    report: dict[str, Any] = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": THREADS,
        "runs": runs,
        "warmup": warmup,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if "calibration" in args.sections:
            report["calibration"] = [calibration_section(m, warmup, runs) for m in ("minilm", "digits-cnn")]
        if "speed" in args.sections:
            report["speed_minilm"] = speed_section_minilm(tmp, warmup, runs, levels)
        if "speed-digits" in args.sections:
            report["speed_digits"] = [speed_section_digits(m, tmp, warmup, runs) for m in ("digits-cnn", "digits-mlp")]
        if "export" in args.sections:
            report["export"] = export_section(tmp, 1 if args.quick else 3)
        if "families" in args.sections:
            report["families"] = families_section(tmp, warmup, runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
