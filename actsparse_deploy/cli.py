"""The ``actsparse`` command line: thin commands over the Python API.

    $ actsparse models
    $ actsparse calibrate digits-cnn -o masks.safetensors
    $ actsparse calibrate my_pkg.models:build --weights w.safetensors \\
          --data calib.npz --layers "encoder.*.fc2" --sparsity 0.5 -o masks.safetensors

Errors become a one-line message on stderr and the exit code of their class
(see the README); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__, zoo
from .calibrate import batch_size, calibrate
from .errors import ActsparseError, RecipeError
from .files import check_output_path
from .functions import AGGREGATE_FNS
from .loading import load_data, load_model
from .masks import Masks
from .recipe import Recipe

app = typer.Typer(
    name="actsparse",
    help="Calibrate activation masks on real data, bake them into a PyTorch model and export a validated ONNX model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

# --- options shared by several commands ------------------------------------------

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A built-in model name (see `actsparse models`) or package.module:factory, "
        "a callable that returns your torch.nn.Module.",
        show_default=False,
    ),
]
WeightsOpt = Annotated[
    Optional[Path],
    typer.Option("--weights", "-w", help="Weights for the model: .safetensors, or a .pt state dict (loaded with weights_only=True)."),
]
DataOpt = Annotated[
    Optional[str],
    typer.Option(
        "--data",
        "-d",
        help="Calibration data: a .npy/.npz/.safetensors/.pt file of inputs (batch axis first), or "
        "package.module:function returning batches. Default for built-in models: their calibration split.",
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Samples per batch when data comes from a file.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")]


def _version(value: bool) -> None:
    if value:
        stdout.print(f"actsparse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """actsparse: activation sparsity from calibration to validated ONNX."""


def handle_errors(fn: F) -> F:
    """Turn library errors into a one-line message and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", False)
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except ActsparseError as e:
            if verbose:
                traceback.print_exc(file=sys.stderr)
            stderr.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("interrupted: no output was written")
            raise typer.Exit(130) from None
        except Exception as e:  # a bug, not a user mistake: still one line unless --verbose
            if verbose:
                traceback.print_exc(file=sys.stderr)
            stderr.print(f"internal error: {type(e).__name__}: {e} (run with --verbose for the traceback)", markup=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# --- models ----------------------------------------------------------------------


@app.command("models")
@handle_errors
def models_cmd(as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """List the built-in models, with their test accuracy and built-in recipe."""
    rows = []
    for name in zoo.builtin_names():
        entry = zoo.get_builtin(name)
        weights = zoo.builtin_weights_path(name)
        meta = zoo.builtin_metadata(name) if weights.is_file() else {}
        rows.append(
            {
                "name": name,
                "description": entry.description,
                "task": entry.task,
                "test_accuracy": float(meta["test_accuracy"]) if "test_accuracy" in meta else None,
                "weights": str(weights),
                "recipe": str(zoo.builtin_recipe_path(name)),
            }
        )
    if as_json:
        _emit_json(rows)
        return
    table = Table("name", "description", "test accuracy", "recipe")
    for row in rows:
        acc = f"{row['test_accuracy']:.4f}" if row["test_accuracy"] is not None else "no weights"
        table.add_row(row["name"], row["description"], acc, row["recipe"])
    stdout.print(table)


# --- calibrate -------------------------------------------------------------------


def build_recipe(
    model_name: str,
    builtin: bool,
    recipe: Path | None,
    layers: list[str] | None,
    layer_types: list[str] | None,
    sparsity: float | None,
    threshold: float | None,
    aggregate: str,
    structured: bool,
) -> Recipe:
    """The recipe the flags describe: a file, a one-rule recipe from flags, or
    the built-in model's own (with --sparsity applied to it)."""
    if recipe is not None:
        if layers or layer_types or threshold is not None or structured:
            raise RecipeError("--recipe cannot be combined with --layers, --layer-type, --threshold or --structured")
        loaded = Recipe.load(recipe)
        return loaded.with_sparsity(sparsity) if sparsity is not None else loaded
    if layers or layer_types:
        if sparsity is None and threshold is None:
            raise RecipeError("--layers / --layer-type need --sparsity or --threshold")
        return Recipe.simple(layers, layer_types, sparsity, threshold, aggregate, structured)
    if not builtin:
        raise RecipeError(f"{model_name!r} has no built-in recipe: pass --recipe FILE, or --layers with --sparsity")
    loaded = Recipe.load(zoo.builtin_recipe_path(model_name))
    if threshold is not None or structured:
        raise RecipeError("--threshold and --structured need --layers (the built-in recipe already chooses)")
    return loaded.with_sparsity(sparsity) if sparsity is not None else loaded


def _print_masks_table(masks: Masks, title: str) -> None:
    table = Table("layer", "input shape", "mask shape", "sparsity", title=title)
    for row in masks.summary():
        input_shape = "x".join(map(str, row["input_shape"])) if row["input_shape"] else "?"
        shape = row["mask_shape"]
        shape_text = "x".join(map(str, shape)) if shape and isinstance(shape[0], int) else f"{len(shape)} features"
        table.add_row(row["layer"], input_shape, shape_text or "scalar", f"{row['sparsity']:.1%}")
    stdout.print(table)


@app.command("calibrate")
@handle_errors
def calibrate_cmd(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the masks (.safetensors).")],
    weights: WeightsOpt = None,
    recipe: Annotated[
        Optional[Path], typer.Option("--recipe", "-r", help="A recipe TOML file (which layers, which functions, how sparse).")
    ] = None,
    layers: Annotated[
        Optional[list[str]], typer.Option("--layers", "-l", help="Glob over module names to mask (repeatable), e.g. 'encoder.*.fc2'.")
    ] = None,
    layer_types: Annotated[
        Optional[list[str]], typer.Option("--layer-type", help="Module class to mask (repeatable), e.g. Linear or Conv2d.")
    ] = None,
    sparsity: Annotated[
        Optional[float],
        typer.Option(
            "--sparsity", "-s", min=0.0, max=1.0, help="Fraction of activations to zero (topk). On a built-in model alone: overrides its recipe."
        ),
    ] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Zero activations whose statistic is below this value instead.")] = None,
    aggregate: Annotated[
        str, typer.Option("--aggregate", help=f"Statistic over the data: {', '.join(AGGREGATE_FNS.names())}.")
    ] = "sum_abs",
    structured: Annotated[
        bool, typer.Option("--structured", help="One mask value per input feature / channel (foldable into weights).")
    ] = False,
    data: DataOpt = None,
    batch: BatchSizeOpt = 32,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Learn activation masks from calibration data and write them to a .safetensors file."""
    check_output_path(output, overwrite)
    loaded = load_model(model, weights)
    the_recipe = build_recipe(model, loaded.builtin, recipe, layers, layer_types, sparsity, threshold, aggregate, structured)
    if data is not None:
        batches = load_data(data, batch)
    elif loaded.builtin:
        batches = zoo.calibration_batches(model, batch)
    else:
        raise RecipeError(f"{model!r} has no built-in data: pass --data FILE")
    total = sum(batch_size(b) for b in batches) if isinstance(batches, list) else None
    with Progress(
        TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"), TimeElapsedColumn(),
        console=stderr, transient=True, disable=as_json or not stderr.is_terminal,
    ) as progress:
        task = progress.add_task("calibrate", total=total)
        masks = calibrate(loaded.module, the_recipe, batches, model_name=model, on_batch=lambda n: progress.advance(task, n))
    masks.save(output)
    if as_json:
        _emit_json({"output": str(output), **masks.to_json()})
        return
    _print_masks_table(masks, f"{model}: {masks.num_samples} calibration samples")
    stdout.print(f"overall sparsity {masks.overall_sparsity():.1%}; masks written to {output}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
