"""float16 against float32 under onnxruntime on this CPU: a Llama MLP's two MatMuls, decode and prefill.

Builds two ONNX graphs of the same MatMul -> Relu -> MatMul (hidden ``--hidden``,
intermediate ``--intermediate``: TinyLlama's by default), one with float32 weights and
inputs, one with float16, and times each under onnxruntime (``--threads``, the median
of ``--runs`` after 3 warm-up runs) at 1 row (a decode step) and at ``--rows`` rows (a
prefill). Prints milliseconds and the float16 / float32 ratio: what ``--dtype float16``
(the default for a bfloat16 or float16 source) costs or saves in speed here, beside
halving the weights.

    python tools/measure_half_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def graph(dtype: type, hidden: int, intermediate: int, seed: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    kind = TensorProto.FLOAT if dtype is np.float32 else TensorProto.FLOAT16
    up = numpy_helper.from_array((rng.standard_normal((hidden, intermediate)) * 0.02).astype(dtype), "up")
    down = numpy_helper.from_array((rng.standard_normal((intermediate, hidden)) * 0.02).astype(dtype), "down")
    nodes = [helper.make_node("MatMul", ["x", "up"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "down"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", kind, [None, hidden])],
                          [helper.make_tensor_value_info("y", kind, [None, hidden])], [up, down])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def timed(session, x: np.ndarray, runs: int) -> float:
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    rows: dict[str, dict[str, float]] = {}
    for name, dtype in (("float32", np.float32), ("float16", np.float16)):
        session = ort.InferenceSession(graph(dtype, args.hidden, args.intermediate, 0), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(1).standard_normal((args.rows, args.hidden)).astype(dtype)
        rows[name] = {"decode_ms": timed(session, x[:1], args.runs), "prefill_ms": timed(session, x, args.runs)}
    ratio = {k: rows["float16"][k] / rows["float32"][k] for k in ("decode_ms", "prefill_ms")}
    print(json.dumps({"onnxruntime": ort.__version__, "threads": args.threads, "rows": args.rows, "ms": rows,
                      "float16_over_float32": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
