"""What an onnxruntime session of an ONNX model adds to the process's resident memory, against the size of its weights.

Opens the model (with its external data) in one CPU session, one thread, in a fresh process,
and prints one JSON object: the weights' bytes by dtype (from the file, not loaded), the
resident memory before and with the session, and the ratio of the difference to the weights.
A float16 model on a CPU provider that runs its MatMuls in float32 holds its weights cast:
about twice their bytes (what ``actsparse_deploy.base.memory.HALF_RUNTIME`` counts).

    python tools/measure_session_memory.py out/model.onnx
    python tools/measure_session_memory.py out/model.onnx --no-prepack
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def weight_bytes(path: Path) -> dict[str, int]:
    """The initializers' bytes per ONNX dtype name, read from the graph (the data files not loaded)."""
    import onnx
    from onnx import TensorProto

    per: dict[str, int] = {}
    for init in onnx.load(str(path), load_external_data=False).graph.initializer:
        count = 1
        for d in init.dims:
            count *= d
        name = TensorProto.DataType.Name(init.data_type).lower()
        size = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        per[name] = per.get(name, 0) + count * size
    return per


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--no-prepack", action="store_true", help="onnxruntime's session.disable_prepacking")
    args = parser.parse_args()
    import onnxruntime as ort

    weights = weight_bytes(args.model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    if args.no_prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    before = resident()
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    held = resident() - before
    total = sum(weights.values())
    print(json.dumps({"model": str(args.model), "weights_bytes": weights, "resident_before": before, "session_bytes": held,
                      "session_over_weights": round(held / total, 2) if total else None, "prepack": not args.no_prepack,
                      "inputs": len(session.get_inputs())}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
