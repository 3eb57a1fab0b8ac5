"""Names and defaults shared by the library and the command line, in a module
that imports nothing heavy: the CLI builds its options and help texts from
these without importing torch or onnx (``actsparse --help`` stays fast).

    >>> from actsparse_deploy.base.constants import DEFAULT_EXPORTER, EXPORTERS, MODES
    >>> MODES, DEFAULT_EXPORTER in EXPORTERS
    (('auto', 'mul', 'fold', 'prune'), True)

The stage modules import their constants from here (``squash.MODES``,
``export.EXPORTERS``, ``validate.DEFAULT_ATOL``), so there is one definition each.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "MODELS_DIR_ENV",
    "models_dir",
    "BUILTIN_AGGREGATES",
    "COMPENSATIONS",
    "DEFAULT_AGGREGATE",
    "DEFAULT_ATOL",
    "DEFAULT_EXPORTER",
    "DEFAULT_MODE",
    "DEFAULT_RTOL",
    "EXPORTERS",
    "EXPORT_DTYPES",
    "HALF_ATOL",
    "HALF_RTOL",
    "HF_TASKS",
    "MAX_LENGTH",
    "MAX_RUNS",
    "METHODS",
    "MODES",
]

#: how masks become part of the model (see squash.py)
MODES = ("auto", "mul", "fold", "prune")
DEFAULT_MODE = "auto"

#: torch.onnx exporters (see export.py); auto: one, then the other where it fails (export.AUTO_ORDER)
EXPORTERS = ("auto", "dynamo", "torchscript")
#: Chosen by measurement (tools/exporters.py: TorchScript fails on Hugging Face decoders): see the README.
DEFAULT_EXPORTER = "auto"

#: what a Hugging Face model directory is loaded for (see hf.py): the command line's --task choices
HF_TASKS = ("feature-extraction", "sentence-embedding", "causal-lm", "sequence-classification")

#: the aggregate functions functions.py registers (a test checks the two agree)
BUILTIN_AGGREGATES = ("gram", "max_abs", "moments", "sum", "sum_abs", "sum_sq")
DEFAULT_AGGREGATE = "sum_abs"

#: the selection methods methods.py registers (scores that see the consumer's
#: weight; a test checks they are registered): the command line's --method choices
METHODS = ("wanda", "fluctuation", "obs")
#: how squash compensates the consumer for the features a mask removes (see
#: compensate.py): the command line's --compensate choices
COMPENSATIONS = ("none", "bias", "lstsq")

#: the most tokens per text (--max-length): more than a text line can make (streams.MAX_LINE_BYTES, 16 MiB)
MAX_LENGTH = 2**24
#: the most timed onnxruntime runs per model a sweep makes (--runs; each level of each method times two models)
MAX_RUNS = 1000

#: ONNX vs PyTorch tolerances (see validate.py)
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 0.0
#: a float16 export's tolerances where none were asked for: float16 keeps about three significant digits, and
#: over a deep model's layers two float16 implementations drift apart (a 22-layer Llama's logits: 0.014)
HALF_ATOL = 5e-2
HALF_RTOL = 2e-2

#: the weights' dtype an export writes (``--dtype``): auto (float16 where the source weights are half
#: precision, bfloat16 or float16, else float32), float32, float16 (onnxruntime runs no bfloat16 MatMul on CPU)
EXPORT_DTYPES = ("auto", "float32", "float16")


def hub_offline() -> None:
    """Never let ``transformers`` / ``huggingface_hub`` reach the network: every
    model is read from disk. Called by each module that imports transformers,
    before it is first imported (a user's own setting is kept)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


MODELS_DIR_ENV = "ACTSPARSE_MODELS_DIR"


def models_dir() -> Path:
    """Shipped weights and recipes dir: ``$ACTSPARSE_MODELS_DIR``, else the repo's ``models/``."""
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parents[2] / "models"
