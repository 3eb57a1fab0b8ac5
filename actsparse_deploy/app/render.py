"""What the command line shows: consoles that print the user's text as is, the
progress line on stderr, and each report as tables and lines of text.

The functions here build what to print (rich tables and strings) from typed
reports; the command line prints them. Every string a report holds is the
user's text (layer names, paths, file metadata): the consoles never read markup
in it and strip control characters.

    >>> clean("\\x1b[31mred\\x1b[0m\\x07 text"), one_line("two\\n  lines")
    ('red text', 'two lines')
    >>> figure(12345.6), figure(9.54e-06), milliseconds(41.25), milliseconds(1090.4), size(2048)
    ('12346', '9.54e-06', '41.2 ms', '1.09 s', '2.0 KB')
    >>> from actsparse_deploy.app.report import Cost
    >>> cost_lines(Cost(outputs=[], heldout_samples=8, accuracy_dense=0.9, accuracy_sparse=0.85))
    ['accuracy dense 0.9000 -> sparse 0.8500']

This module imports nothing heavy (no torch, no onnx).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from ..base.memory import format_bytes
from ..onnx.latency import verdict
from .report import BudgetSearch, Cost, DecodeLatency, Generation, Quantization, QuantizedCheck, Report, SweepResult

__all__ = [
    "Notices",
    "SafeConsole",
    "StageProgress",
    "budget_lines",
    "clean",
    "convert_summary",
    "cost_lines",
    "emit_json",
    "export_line",
    "figure",
    "files_line",
    "layers_table",
    "masks_lines",
    "masks_table",
    "memory_lines",
    "milliseconds",
    "models_table",
    "modes_table",
    "onnx_lines",
    "one_line",
    "quantization_lines",
    "quantized_check_lines",
    "recipe_text",
    "size",
    "stage_progress",
    "stats_lines",
    "stderr",
    "stdout",
    "sweep_lines",
    "validation_lines",
]

# ANSI escape sequences (CSI, OSC up to BEL / ST, two-byte ones), then any other
# control character but newline and tab: file and user text never reaches the terminal raw
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` without escape sequences and control characters (newline and tab kept)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def one_line(text: str) -> str:
    """``text`` cleaned and on one line (for messages on stderr)."""
    return " ".join(clean(text).split())


class SafeConsole(Console):
    """A console that never reads markup in text and strips control characters from
    every string it renders (table cells and titles included): layer names, paths
    and file metadata are the user's text, printed as is. Styling comes from rich
    ``Text`` objects built in code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("markup", False)
        kwargs.setdefault("emoji", False)
        kwargs.setdefault("highlight", False)
        super().__init__(*args, **kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        kwargs["markup"] = kwargs["emoji"] = False
        return super().render_str(clean(text), **kwargs)


stdout = SafeConsole(soft_wrap=True)
stderr = SafeConsole(stderr=True)


class Notices(logging.Handler):
    """The library's notices (``actsparse_deploy`` log warnings, e.g. leftovers of
    killed runs removed) as plain lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        stderr.print(record.getMessage(), markup=False, highlight=False, soft_wrap=True)


class StageProgress:
    """One progress line on stderr: the stage (calibrating, squashing, exporting,
    validating, measuring cost), a bar, and samples done / total where known."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("", total=None, count="")
        self.counting = False
        self.done = 0
        self.total: int | None = None

    def _count(self) -> str:
        if not self.counting:
            return ""
        return f"{self.done}/{self.total} samples" if self.total is not None else f"{self.done} samples"

    def on_stage(self, name: str, total: int | None = None) -> None:
        self.counting, self.done, self.total = name == "calibrating", 0, total
        self.progress.reset(self.task, total=total, description=name, count=self._count())
        self.progress.refresh()

    def on_batch(self, n: int) -> None:
        self.done += n
        self.progress.update(self.task, advance=n, count=self._count())


@contextlib.contextmanager
def stage_progress(quiet: bool, console: Console) -> Iterator[StageProgress]:
    """A :class:`StageProgress` on ``console`` (a terminal only, not with --json)."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
        console=console, transient=True, disable=quiet or not console.is_terminal,
    ) as progress:
        yield StageProgress(progress)


def emit_json(data: Report | list[dict[str, Any]]) -> None:
    """A report (every command but ``models``: one schema) or a list, as JSON on stdout;
    a report without its thread count gets the command's (``--threads``)."""
    if isinstance(data, Report) and data.threads is None:
        from ..base.threads import current_threads

        data = data.replace(threads=current_threads())
    sys.stdout.write(json.dumps(data.to_json() if isinstance(data, Report) else data, indent=2) + "\n")


# --- figures a person reads ---------------------------------------------------------


def figure(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, a large one written out whole
    (12346, never 1.23e+04); a very small one keeps its exponent (9.54e-06)."""
    if abs(value) >= 10**digits - 0.5:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def milliseconds(value: float) -> str:
    """A duration in milliseconds as a person reads it: ``41.2 ms``, ``1.09 s``."""
    if value < 999.5:
        return f"{value:.3g} ms"
    return f"{figure(value / 1000)} s"


def size(n: int) -> str:
    """A file size in bytes as a person reads it."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


# --- tables -------------------------------------------------------------------------


def names_table(*headers: str, title: str | None = None) -> Table:
    """A table whose cells wrap (long layer names and paths fold onto more lines),
    never cut: in a narrow terminal the distinguishing end of a name stays visible."""
    return Table(*(Column(header, overflow="fold") for header in headers), title=title)


def models_table(rows: Sequence[dict[str, Any]]) -> Table:
    """``actsparse models``: each built-in model with its test accuracy and recipe."""
    table = names_table("name", "description", "test accuracy", "recipe")
    for row in rows:
        acc = f"{row['test_accuracy']:.4f}" if row["test_accuracy"] is not None else "-"
        table.add_row(row["name"], row["description"], acc, row["recipe"])
    return table


def masks_table(report: Report, title: str) -> Table:
    """A masks file's layers: input shape, mask shape, sparsity."""
    table = names_table("layer", "input shape", "mask shape", "sparsity", title=title)
    for row in report.layers or []:
        input_shape = "x".join(str(n) if isinstance(n, int) else f"<{n}>" for n in row["input_shape"]) if row["input_shape"] else "?"
        shape = row["mask_shape"]
        shape_text = "x".join(map(str, shape)) if shape and isinstance(shape[0], int) else f"{len(shape)} features"
        table.add_row(row["layer"], input_shape, shape_text or "scalar", f"{row['sparsity']:.1%}")
    return table


def masks_lines(report: Report, title: str, output: Path) -> list[RenderableType]:
    """``calibrate`` and ``select``: the masks' table, the overall sparsity and where they went (and, where
    ``calibrate`` kept within a memory budget, how)."""
    lines: list[RenderableType] = [masks_table(report, title), f"overall sparsity {report.overall_sparsity or 0:.1%}; masks written to {output}"]
    return lines + memory_lines(report)


def memory_lines(report: Report) -> list[RenderableType]:
    """``calibrate``'s memory where it kept within a budget: block by block or not, the peak."""
    memory = report.memory
    if memory is None:
        return []
    budget = f" of {format_bytes(memory.budget_bytes)}" if memory.budget_bytes is not None else ""
    weights = format_bytes(memory.weights_bytes)
    how = (f"calibrated block by block (the weights, {weights}, read from their files a layer at a time)"
           if memory.by_block else f"calibrated with the weights ({weights}) in memory")
    passes = f", the statistics of a few blocks at a time ({memory.passes} passes over the data)" if memory.passes else ""
    return [f"{how}{passes}; peak memory {format_bytes(memory.peak_bytes)}{budget}"]


def stats_lines(report: Report, output: Path) -> list[RenderableType]:
    """A statistics file's layers (statistic, shape, samples), the parts it merges and where it went."""
    samples = report.calibration.samples if report.calibration else 0
    table = names_table("layer", "statistic", "shape", "samples", title=f"{report.model or 'model'}: statistics of {samples} samples")
    for row in report.layers or []:
        table.add_row(row["layer"], str(row["aggregate"]), "x".join(map(str, row["stat_shape"])), str(row["samples"]))
    parts = report.parts
    return [table, f"{'merged ' + str(parts) + ' parts; ' if parts else ''}statistics written to {output}"]


def modes_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Squash rows: each layer's sparsity, the mode it took and why."""
    table = names_table("layer", "sparsity", "mode", "why", title=title)
    for row in rows:
        table.add_row(row["layer"], f"{row['sparsity']:.1%}", row["mode"], row["reason"])
    return table


def layers_table(target: str, report: Report) -> Table:
    """``inspect MODEL``: the layers that can take a mask."""
    table = names_table("layer", "type", "input shape", "fold", title=f"{target}: layers that can take a mask")
    for row in report.layers or []:
        table.add_row(row["layer"], row["type"], "x".join(map(str, row["input_shape"])), "yes" if row["foldable"] else "no")
    return table


def recipe_text(recipe: dict[str, Any]) -> str:
    """A recipe (as a report holds it) as the TOML file it would be."""
    from ..calibration.recipe import Recipe

    return Recipe.from_dict(recipe).dumps().rstrip()


# --- lines of each command ------------------------------------------------------------


def export_line(report: Report, output: Path) -> str:
    """``export``: the exporter, opset, seconds and the file written."""
    result = report.export
    assert result is not None  # export_source always exports
    return (f"{result.exporter} export, opset {result.opset}, {result.seconds:.2f} s: {output} ({size(result.size_bytes)}"
            + (", external data)" if result.external_data else ")"))


def validation_lines(report: Report, title: str, atol: float, rtol: float) -> list[RenderableType]:
    """``validate``: each output's difference against the tolerance, then what passing meant."""
    validation = report.validation
    assert validation is not None  # validate_against raises unless it passed
    if rtol == 0:  # the verdict is max abs diff <= atol: show that, not a relative figure it never used
        table = names_table("output", "max abs diff", "tolerance", title=title)
        for diff in validation.outputs:
            table.add_row(diff["output"], f"{diff['max_abs_diff']:.2e}", f"<= atol {atol:.2e}")
    else:  # per value |diff| <= atol + rtol * |PyTorch|: the worst ratio is the verdict's figure
        table = names_table("output", "max abs diff", "max rel diff", "worst diff / tolerance", title=title)
        for diff in validation.outputs:
            table.add_row(
                diff["output"], f"{diff['max_abs_diff']:.2e}", f"{diff['max_rel_diff']:.2e}", f"{diff['max_tolerance_used']:.3g} <= 1"
            )
    return [table, f"{validation.samples} held-out samples at batch sizes {validation.batch_sizes}; "
                   f"passes where |ONNX - PyTorch| <= atol {atol:g} + rtol {rtol:g} * |PyTorch| for every value"]


def cost_lines(cost: Cost | None, before_int8: bool = False) -> list[str]:
    """What sparsification cost: cosine per output (and on other text), accuracy, perplexity. ``before_int8``: the
    model written is quantized after these were measured: the lines say they are the float sparse model's."""
    if cost is None:
        return []
    whose, onnx = (" (the float sparse model, before int8)", "float ONNX") if before_int8 else ("", "ONNX")
    lines = [f"sparsification cost{whose}, {row['output']}: cosine to dense mean {row['cosine_mean']:.4f} "
             f"(worst {row['cosine_min']:.4f}), max abs diff {figure(row['max_abs_diff'])}" for row in cost.outputs]
    if cost.other_text is not None:
        lines += [f"other text ({cost.other_text.samples} samples), {row['output']}: cosine to dense mean {row['cosine_mean']:.4f} "
                  f"(worst {row['cosine_min']:.4f})" for row in cost.other_text.outputs]
    if cost.accuracy_dense is not None:
        lines.append(f"accuracy dense {cost.accuracy_dense:.4f} -> sparse {cost.accuracy_sparse:.4f}"
                     + (f" ({onnx} {cost.accuracy_onnx:.4f})" if cost.accuracy_onnx is not None else ""))
    ppl = cost.perplexity
    if ppl is not None:
        lines.append(f"held-out perplexity dense {ppl.dense:.3f} -> sparse {ppl.sparse:.3f} (x{ppl.ratio:.3f})"
                     + (f" ({onnx} {ppl.onnx:.3f})" if ppl.onnx is not None else ""))
    other = cost.other_text
    if other is not None and other.perplexity_dense is not None and other.perplexity_sparse is not None:
        lines.append(f"other text perplexity dense {other.perplexity_dense:.3f} -> sparse {other.perplexity_sparse:.3f} "
                     f"(x{other.perplexity_sparse / other.perplexity_dense:.3f})")
    return lines


def _other_text_budget_lines(budget: BudgetSearch, int8: dict[str, Any] | None) -> list[RenderableType]:
    """``--max-cost-other``: the other text the budget held on too, and the final model's cost on it (``int8``: the
    quantized model's check, ``quantization.budget``, where it is the model written)."""
    other = budget.other_text
    if not other:
        return []
    line = (f"budget {budget.budget}: held on the other text too ({other['samples']} samples): "
            f"{figure(other['tuning_cost'], 4)} at the levels chosen")
    if other.get("cost") is not None:
        line += f"; the sparse model {figure(other['cost'], 4)} on it"
        if int8 is None:  # the float model is the one written: its verdict
            line += ": " + ("within the budget" if other["within"] else "MISSED")
    if int8 is not None and int8.get("other_text_cost") is not None:
        line += f"; the int8 model {figure(int8['other_text_cost'], 4)} on it: within the budget"
    return [line]


def _int8_room_lines(budget: BudgetSearch) -> list[RenderableType]:
    """``--quantize`` under the budget: what int8 alone cost, what the sparsity was searched to, the quantized model's tuning cost."""
    q = budget.quantization
    if not q:
        return []
    if q["mode"] == "none":
        return [f"budget {budget.budget}: int8 left out (--quantize auto): {q['why']}"]
    line = f"budget {budget.budget}: {q['mode']} alone costs {figure(q['share'], 4)} on the tuning split"
    if "searches" in q:
        line += (f"; the sparsity searched to {q['searched_budget']} ({q['searches']} search(es)), the {q['mode']} model "
                 f"{figure(q['int8_tuning_cost'], 4)} +- {figure(q['int8_tuning_error'], 2)} on the tuning split")
    return [line]


def _kept_by(budget: BudgetSearch) -> str:
    """`` +- 0.0004 (kept by 3 standard errors)`` where the search held its candidates with a margin."""
    if not budget.doubt or not budget.tuning_error:
        return ""
    return f" +- {figure(budget.tuning_error, 2)} (kept by {budget.doubt:g} standard errors)"


def budget_lines(budget: BudgetSearch | None, quantization: Quantization | None = None) -> list[RenderableType]:
    """The levels a --max-cost search chose per layer, its tuning and held-out cost, and whether it kept the budget
    (``quantization``: with ``--quantize``, the figures of the int8 model that is written, the float sparse model's beside)."""
    if budget is None:
        return []
    int8 = quantization.budget if quantization is not None else None
    table = names_table("layer", "level", title=f"budget {budget.budget}: levels chosen per layer")
    for name, level in budget.levels.items():
        table.add_row(name, f"{level:.1%}")
    lines: list[RenderableType] = [table, (
        f"budget {budget.budget}: overall sparsity {budget.overall_sparsity:.1%} (uniform start {budget.uniform_level:.1%}), "
        f"cost {figure(budget.tuning_cost, 4)}{_kept_by(budget)} on the tuning split ({budget.tuning_samples} calibration samples, "
        f"{budget.evaluations} allocations measured)"
    )]
    lines += [*_int8_room_lines(budget), *_other_text_budget_lines(budget, int8)]
    heldout = budget.heldout
    if int8 is not None:  # the model written: the int8 one (over the budget it is exit 10, nothing written)
        float_cost = f" (the float sparse model: {figure(heldout.cost, 4)})" if heldout is not None and heldout.cost is not None else ""
        lines.append(f"budget {budget.budget}: held-out cost of the int8 model {figure(int8['heldout_cost'], 4)}: within the budget{float_cost}")
    elif heldout is None or heldout.cost is None:
        note = heldout.note if heldout is not None and heldout.note is not None else "held-out cost not measured"
        lines.append(f"budget {budget.budget}: {note}")
    elif heldout.within:
        lines.append(f"budget {budget.budget}: held-out cost {figure(heldout.cost, 4)}: within the budget")
    else:
        lines.append(f"budget {budget.budget}: held-out cost {figure(heldout.cost, 4)}: MISSED, the held-out "
                     "data exceeds the budget")
    return lines


def convert_summary(report: Report) -> list[RenderableType]:
    """``convert``: layers and modes, ONNX vs PyTorch, the exporter's fallback, cost, budget, latency (then notes, then :func:`files_line`)."""
    samples = report.calibration.samples if report.calibration else "?"
    lines: list[RenderableType] = [modes_table(report.layers or [], f"{report.model}: {samples} calibration samples")]
    validation, export = report.validation, report.export
    if validation is not None and export is not None:
        lines.append(
            f"ONNX ({export.exporter}, opset {export.opset}) vs PyTorch: max abs diff "
            f"{validation.max_abs_diff:.2e} <= {validation.atol:g} at batch sizes {validation.batch_sizes}"
            + "".join(f", {label} lengths {lengths}" for label, lengths in (validation.sequence_lengths or {}).items())
            + ": PASSED"
        )
        request = export.request
        if request is not None and request.fallback:
            lines.append(f"exporter {request.requested_exporter}: {request.fallback}; exported with {export.exporter}")
        lines += generation_lines(validation.generation)
    lines += [*cost_lines(report.cost, before_int8=report.quantization is not None), *budget_lines(report.budget, report.quantization)]
    latency = report.latency
    if latency is not None:
        apart = ", one model at a time to keep within the memory budget" if latency.one_at_a_time else ""
        lines.append(
            f"onnxruntime latency ({_plural(latency.threads, 'thread')}, median of {latency.runs} "
            f"passes over {latency.samples} held-out samples{apart}): dense {milliseconds(latency.dense_ms)}, converted "
            f"{milliseconds(latency.sparse_ms)}: {latency.verdict}"
        )
        lines += decode_lines(latency.decode)
    return [*lines, *quantization_lines(report.quantization)]


def _variant_cost(row: dict[str, Any]) -> str:
    """A frontier row's cost against the dense PyTorch model, the figures the model has."""
    parts = []
    if row.get("perplexity_ratio") is not None:
        parts.append(f"perplexity x{row['perplexity_ratio']:.3f}")
    if row.get("accuracy") is not None:
        parts.append(f"accuracy {row['accuracy']:.4f}")
    outputs = row.get("outputs") or [{}]
    # a decoder's logits (not its cache), else the last output (a sentence embedding, what a budget's cosine reads)
    shown = next((o for o in outputs if o.get("output") == "logits"), outputs[-1])
    if "cosine_mean" in shown:
        parts.append(f"cosine {shown['cosine_mean']:.4f} (worst {shown['cosine_min']:.4f})")
    return ", ".join(parts)


def _counts(ops: dict[str, int]) -> str:
    """Node counts by op type as ``3 MatMulInteger, 3 DynamicQuantizeLinear``."""
    return ", ".join(f"{n} {op}" for op, n in ops.items())


def quantized_check_lines(checked: QuantizedCheck | None) -> list[RenderableType]:
    """``validate --max-cost`` of a quantized model: its quantized nodes, its held-out cost by the budget, its closeness
    to the float model it was made from."""
    if checked is None:
        return []
    kind = checked.budget.split("=")[0]
    lines: list[RenderableType] = [
        f"quantized ({_counts(checked.ops)}): held to a cost budget, not a tolerance; held-out cost {kind}="
        f"{checked.heldout_cost:.4f} against the dense model: within the budget {checked.budget}"]
    if checked.other_text_cost is not None:
        verdict = "within the budget" if checked.other_text_within else "over the budget"
        lines.append(f"other text ({checked.other_text_samples} samples): {kind}={checked.other_text_cost:.4f}: "
                     f"{verdict} (reported, not held: the held-out data decides)")
    if checked.float_source is not None:
        lines.append(f"to the squashed float model it was made from, {checked.float_source['output']}: cosine mean "
                     f"{checked.float_source['cosine_mean']:.4f} (worst {checked.float_source['cosine_min']:.4f})")
    return lines


def quantization_lines(quantization: Quantization | None) -> list[RenderableType]:
    """What ``--quantize`` did, and the alternatives side by side (the frontier)."""
    if quantization is None:
        return []
    ops = _counts(quantization.quantized) or "no node"
    lines: list[RenderableType] = [
        f"quantized ({quantization.mode}, onnxruntime, per-channel weights): {ops}; "
        f"{size(quantization.size_before)} -> {size(quantization.size_after)}"]
    if quantization.smoothing is not None:
        lines.append(f"smoothing: {quantization.smoothing['summary']} (report.json: quantization.smoothing, per layer and why)")
    if quantization.frontier:
        other, decode = "other_text" in quantization.frontier[0], "decode_ratio" in quantization.frontier[0]
        columns = ["variant", "size", "latency", *(["decode"] if decode else []), "cost against the dense model",
                   *(["on other text"] if other else [])]
        table = Table(*columns, title="the alternatives on held-out data (latency: onnxruntime, the dense export = 1.00x)")
        for row in quantization.frontier:
            table.add_row(row["variant"], size(row["size_bytes"]), f"{row['latency_ratio']:.2f}x",
                          *([f"{row['decode_ms_per_token']:.2f} ms/token ({row['decode_ratio']:.2f}x)"] if decode else []),
                          _variant_cost(row), *([_variant_cost(row["other_text"])] if other else []))
        lines.append(table)
    return lines


def generation_lines(generation: Generation | None) -> list[RenderableType]:
    """A decoder's generation check, in one line."""
    if generation is None:
        return []
    return [f"decoder with KV cache: prefill and token-by-token logits within {generation.prefill_max_abs_diff:.2e}; "
            f"{generation.new_tokens} greedy tokens after {_plural(generation.prompts, 'held-out prompt')}: "
            f"{'identical' if generation.tokens_identical else 'DIFFERENT'} (max abs diff {generation.max_abs_diff:.2e})"]


def decode_lines(decode: DecodeLatency | None) -> list[RenderableType]:
    """A decoder's speed per generated token, dense and converted, both with their cache."""
    if decode is None:
        return []
    return [f"decode with cache (batch 1, {decode.prompt_tokens}-token prompt, {decode.new_tokens} new tokens, median of "
            f"{decode.runs}): dense {decode.dense_ms_per_token:.3g} ms/token ({decode.dense_tokens_per_s:.0f} tokens/s), converted "
            f"{decode.sparse_ms_per_token:.3g} ms/token ({decode.sparse_tokens_per_s:.0f} tokens/s): {verdict(decode.ratio)}"]


def files_line(report: Report) -> str:
    """``convert``'s last line: the files written, the seconds in all and the threads."""
    files = ", ".join(f"{name} {size(n)}" for name, n in (report.files or {}).items())
    threads = f", {_plural(report.threads, 'thread')}" if report.threads is not None else ""
    peak = f", peak memory {format_bytes(report.memory.peak_bytes)}" if report.memory is not None else ""
    return f"files: {files}; {(report.seconds or {}).get('total', 0.0):.1f} s in all{threads}{peak}"


def onnx_lines(target: str, report: Report) -> list[RenderableType]:
    """``inspect MODEL.onnx``: inputs and outputs, operators, initializers, external data files, squash rows."""
    assert report.export is not None and report.export.graph is not None
    graph = report.export.graph
    opsets = ", ".join(f"{domain} {version}" for domain, version in graph.opsets.items())
    table = names_table("", "name", "dtype", "shape",
                        title=f"{target}: ONNX model ({opsets}; {graph.nodes} nodes, {graph.initializers} initializers, "
                              f"{graph.parameters:,} parameters, {size(graph.initializer_bytes)})")
    for side, values in (("input", graph.input_shapes), ("output", graph.output_shapes)):
        for value in values:
            shape = "?" if value["shape"] is None else "x".join("?" if d is None else str(d) for d in value["shape"])
            table.add_row(side, value["name"], str(value["dtype"]), shape)
    lines: list[RenderableType] = [table, "operators: " + ", ".join(f"{op} {n}" for op, n in graph.ops.items())]
    for data in graph.data_files:
        where = size(data["bytes"]) if data["present"] else "missing or not a regular file"
        lines.append(f"external data: {data['location']} ({data['tensors']} tensors, {where})")
    if report.layers:
        layers = names_table("layer", "mode", "sparsity", title=f"squashed layers (mode {report.squash_mode})")
        for row in report.layers:
            sparsity = row.get("sparsity")
            layers.add_row(str(row.get("layer")), str(row.get("mode")), f"{sparsity:.1%}" if isinstance(sparsity, (int, float)) else "-")
        lines.append(layers)
    return lines


def sweep_lines(result: SweepResult, output: Path) -> list[RenderableType]:
    """``sweep``: per method and level, sparsity, cosine, accuracy and latency ratio; the files written."""
    table = names_table("method", "level", "overall sparsity", "cosine mean / worst", "accuracy", "latency / dense",
                        title=f"{result.model}: held-out cost and onnxruntime latency ({result.latency.threads} thread)")
    for row in result.rows:
        accuracy = f"{row.accuracy_sparse:.4f} (dense {row.accuracy_dense:.4f})" if row.accuracy_sparse is not None else "-"
        table.add_row(row.variant, f"{row.level:.1%}", f"{row.overall_sparsity:.1%}",
                      f"{row.cosine_mean:.4f} / {row.cosine_min:.4f}", accuracy, f"{row.latency_ratio:.3f}x")
    alone = [f"{mode} alone (the dense export quantized by onnxruntime's one call): latency {a['latency_ratio']:.3f}x, cosine "
             f"{a['cosine_mean']:.4f} / {a['cosine_min']:.4f}" + (f", accuracy {a['accuracy_sparse']:.4f}" if "accuracy_sparse" in a else "")
             for mode, a in (result.int8_alone or {}).items()]
    return [table, *alone, f"written: {output / 'sweep.json'}, {output / 'sweep.png'}"]
