"""The loaders' side of ``tools/check_loaders.py``, run in the loaders' own environment
(optimum-onnx, sentence-transformers 5, transformers 4.57): never in ours.

    python tools/check_loaders_child.py JOBS.json RESULTS.json

Each job names an output folder and the loaders to try on it, as a user would call them:

- ``tokenizer``: ``AutoTokenizer.from_pretrained(folder)``, its ids of the job's texts against ours;
- ``causal-lm``: ``ORTModelForCausalLM.from_pretrained(folder, use_cache=True)``, then for each of
  report.json's prompts ``generate(ids, attention_mask=ones, do_sample=False, num_beams=1,
  max_new_tokens=N, eos_token_id=None)``: greedy, N tokens, the EOS token neither stops it nor is
  suppressed, as our generation check decodes; the tokens against our validation's;
- ``feature-extraction``: ``ORTModelForFeatureExtraction.from_pretrained(folder)`` on the texts
  tokenized by the folder's tokenizer (padded), ``last_hidden_state`` against our onnxruntime run's;
- ``sentence-transformer``: ``SentenceTransformer(folder, backend="onnx").encode(texts)`` against our
  ``sentence_embedding``.

Each loader's result: ``status`` ``works`` (with its figures) or ``error`` (the one-line error),
its seconds, and the warnings the libraries logged while loading.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().splitlines()[0][:200])


@contextmanager
def logged() -> Iterator[list[str]]:
    """The first lines of the warnings optimum, transformers and sentence-transformers log (or warn) inside."""
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("optimum", "transformers", "sentence_transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield handler.lines
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            handler.lines += [str(w.message).splitlines()[0][:200] for w in caught if str(w.message).strip()]


def attempt(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``check()``'s figures with ``status: works``, or ``status: error`` and the one-line error; seconds and warnings."""
    start = time.perf_counter()
    with logged() as lines:
        try:
            result = {"status": "works", **check()}
        except Exception as e:  # every loader's own exception types: recorded, the next check goes on
            text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            result = {"status": "error", "error": f"{type(e).__name__}: {text}"[:300]}
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["warnings"] = list(dict.fromkeys(lines))[:5]
    return result


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    return options


def tokenizer_check(job: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job["folder"])
    ids = tokenizer(job["texts"])["input_ids"]
    return {"class": type(tokenizer).__name__, "texts": len(ids), "ids_equal": ids == job.get("ids")}


def causal_lm_check(job: dict[str, Any], threads: int) -> dict[str, Any]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    if "error" in job:
        raise RuntimeError(job["error"])
    model = ORTModelForCausalLM.from_pretrained(job["folder"], use_cache=True, session_options=session_options(threads))
    n = job["new_tokens"]
    differing = []
    for i, (prompt, ours) in enumerate(zip(job["prompt_ids"], job["tokens"])):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=None)
        if out[0, len(prompt):].tolist() != ours:
            differing.append(i)
    return {"tokens_equal": not differing, "differing": differing, "prompts": len(job["prompt_ids"]), "new_tokens": n,
            "can_use_cache": bool(model.can_use_cache), "is_merged": bool(model.is_merged), "inputs": list(model.input_names)}


def feature_extraction_check(job: dict[str, Any], threads: int) -> dict[str, Any]:
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer

    if "error" in job:
        raise RuntimeError(job["error"])
    model = ORTModelForFeatureExtraction.from_pretrained(job["folder"], session_options=session_options(threads))
    batch = AutoTokenizer.from_pretrained(job["folder"])(job["texts"], padding=True, return_tensors="pt")
    got = model(**batch).last_hidden_state.numpy()
    want = np.load(job["reference"])["last_hidden_state"]
    if got.shape != want.shape:
        raise ValueError(f"last_hidden_state {list(got.shape)}, ours {list(want.shape)}")
    return {"max_abs_diff": float(np.abs(got - want).max()), "shape": list(got.shape), "inputs": list(model.input_names)}


def sentence_transformer_check(job: dict[str, Any], threads: int) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    if "error" in job:
        raise RuntimeError(job["error"])
    model = SentenceTransformer(job["folder"], backend="onnx", device="cpu", model_kwargs={"session_options": session_options(threads)})
    got = model.encode(job["texts"], convert_to_numpy=True)
    want = np.load(job["reference"])["sentence_embedding"]
    if got.shape != want.shape:
        raise ValueError(f"embeddings {list(got.shape)}, ours {list(want.shape)}")
    return {"max_abs_diff": float(np.abs(got - want).max()), "shape": list(got.shape), "modules": [type(m).__name__ for m in model]}


def main(argv: list[str]) -> int:
    import torch

    spec = json.loads(open(argv[0]).read())
    threads = int(spec.get("threads", 1))
    torch.set_num_threads(threads)
    checks: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "tokenizer": tokenizer_check,
        "causal-lm": lambda job: causal_lm_check(job, threads),
        "feature-extraction": lambda job: feature_extraction_check(job, threads),
        "sentence-transformer": lambda job: sentence_transformer_check(job, threads),
    }
    results: dict[str, dict[str, Any]] = {}
    for job in spec["jobs"]:
        results[job["name"]] = {}
        for loader in job["loaders"]:
            cell = attempt(functools.partial(checks[loader], job))
            results[job["name"]][loader] = cell
            shown = cell.get("error") or ", ".join(f"{k} {v}" for k, v in cell.items() if k not in ("status", "warnings", "seconds", "inputs"))
            print(f"{job['name']}: {loader}: {cell['status']} in {cell['seconds']:.2f} s: {shown}", flush=True)
    with open(argv[1], "w") as sink:
        json.dump(results, sink, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
