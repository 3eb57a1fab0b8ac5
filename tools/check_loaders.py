"""Load ``convert``'s output folders with the serving stack's own loaders, and compare what they give with ours.

Optimum's ``optimum-onnx`` and sentence-transformers 5 run on transformers 4.57, ours on
transformers 5, so they are installed in a virtual environment of their own (never into
ours): ``.venv-loaders`` in the repository root (``--venv PATH``), pinned to
:data:`PINS`, ``onnxruntime`` at the version this environment has and the CPU torch of
``constraints.txt``; one that is there with those versions is reused.

Then, step by step, each step's seconds printed:

1. sources: a random-init Llama and a GPT-2 directory (``save_pretrained``, with a byte-level
   BPE tokenizer trained on this repository's README; nothing is downloaded), calibration
   and held-out text from the same README; the packaged all-MiniLM-L6-v2 directory;
2. ``actsparse convert`` (this environment's, one thread, ``--no-latency``) of each
   :data:`CASES` entry into ``OUT/NAME``: the two directories with ``--task causal-lm``
   (the default recipe: a quarter of every MLP down projection's inputs), ``tiny-lm``, the
   MiniLM directory with ``--task feature-extraction`` and ``--task sentence-embedding``;
3. here: ``AutoTokenizer.from_pretrained(folder)`` (ids of a few texts), and, for encoders,
   ``model.onnx`` run by onnxruntime on those ids (the references);
4. in the loaders' environment (``tools/check_loaders_child.py``): ``AutoTokenizer`` (the same
   ids?), ``ORTModelForCausalLM.from_pretrained(folder, use_cache=True).generate(...)`` from
   report.json's ``validation.generation.prompt_ids`` (the same tokens?),
   ``ORTModelForFeatureExtraction.from_pretrained(folder)`` (``last_hidden_state`` within
   ``--atol`` of ours?), ``SentenceTransformer(folder, backend="onnx")`` (``encode`` within
   ``--atol`` of our ``sentence_embedding``?).

Greedy decoding as our generation check does it (``actsparse_deploy.onnx.generate``): the
argmax at every step, ``new_tokens`` of them, an end-of-sequence token neither stops it nor
is kept from being chosen. ``generate`` is called with ``do_sample=False, num_beams=1,
max_new_tokens=N, eos_token_id=None``: no EOS, no stop. (``min_new_tokens=N`` would keep
the EOS token from being chosen, and tokens differ wherever EOS is the argmax.)

It prints a table, task x loader, works or the one-line error, then the figures; ``--json
FILE`` writes them all. Exit code 1 when a convert, a load or a comparison fails.

    .venv/bin/python tools/check_loaders.py                                  # a scratch folder, removed after
    .venv/bin/python tools/check_loaders.py --out out/loaders --json out/loaders.json
    .venv/bin/python tools/check_loaders.py --out out/loaders --reuse --only tiny-lm   # no convert where its folder is there
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHILD = ROOT / "tools" / "check_loaders_child.py"
CONSTRAINTS = ROOT / "constraints.txt"
#: what the loaders' environment holds (with onnxruntime at our version and torch at constraints.txt's)
PINS = {"optimum-onnx": "0.1.0", "sentence-transformers": "5.7.0"}
#: the table's columns: the loaders, in order
LOADERS = ("AutoTokenizer (ours)", "AutoTokenizer (loaders' env)", "ORTModelForCausalLM", "ORTModelForFeatureExtraction",
           "SentenceTransformer onnx")
#: what the child calls each loader
CHILD_LOADERS = {"tokenizer": LOADERS[1], "causal-lm": LOADERS[2], "feature-extraction": LOADERS[3], "sentence-transformer": LOADERS[4]}
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Case:
    """One output folder: ``convert SOURCE [--task TASK]``, and the loaders that read it."""

    name: str
    source: str  # "llama", "gpt2", "minilm": a directory made or found in step 1; else a built-in model's name
    task: str
    loaders: tuple[str, ...]


CASES = (
    Case("llama", "llama", "causal-lm", ("tokenizer", "causal-lm")),
    Case("gpt2", "gpt2", "causal-lm", ("tokenizer", "causal-lm")),
    Case("tiny-lm", "tiny-lm", "causal-lm", ("tokenizer", "causal-lm")),
    Case("minilm-feature-extraction", "minilm", "feature-extraction", ("tokenizer", "feature-extraction")),
    Case("minilm-sentence-embedding", "minilm", "sentence-embedding", ("tokenizer", "feature-extraction", "sentence-transformer")),
)


@dataclass
class Run:
    """What the run found: each step's seconds, each case's results."""

    out: Path
    atol: float
    steps: dict[str, float] = field(default_factory=dict)
    versions: dict[str, dict[str, str]] = field(default_factory=dict)
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"--- {name}", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = round(time.perf_counter() - start, 2)
            print(f"    {name}: {self.steps[name]:.1f} s", flush=True)


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """``Type: first line`` of an error (a string: its last non-blank line), at most ``limit`` characters."""
    if isinstance(error, BaseException):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    else:
        lines = [line.strip() for line in error.splitlines() if line.strip()]
        text = lines[-1] if lines else "(no output)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- 1. the loaders' environment -------------------------------------------------------------


def wanted_versions() -> dict[str, str]:
    """The loaders' environment's pins: :data:`PINS`, our onnxruntime, constraints.txt's torch."""
    torch_pin = next((line.split("==", 1)[1].strip() for line in CONSTRAINTS.read_text().splitlines()
                      if line.strip().startswith("torch==")), None)
    if torch_pin is None:
        raise SystemExit(f"error: {CONSTRAINTS} pins no torch== version")
    return {**PINS, "onnxruntime": metadata.version("onnxruntime"), "torch": torch_pin}


def installed_versions(python: Path, names: list[str]) -> dict[str, str | None]:
    """The versions of ``names`` installed for ``python`` (None: not installed)."""
    code = ("import json, sys\nfrom importlib import metadata\nout = {}\nfor n in sys.argv[1:]:\n"
            "    try: out[n] = metadata.version(n)\n    except metadata.PackageNotFoundError: out[n] = None\nprint(json.dumps(out))")
    done = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _matches(installed: str | None, wanted: str) -> bool:
    return installed is not None and installed.split("+")[0] == wanted


def ensure_venv(venv: Path, log: Path) -> dict[str, str]:
    """The loaders' environment at ``venv``, made or brought to the pins where it is not there with them; its versions."""
    ours = {Path(sys.prefix).resolve(), (ROOT / ".venv").resolve()}
    if venv.resolve() in ours:
        raise SystemExit(f"error: {venv} is this project's environment; the loaders get one of their own (--venv)")
    wanted = wanted_versions()
    python = venv / "bin" / "python"
    names = [*wanted, "transformers", "optimum", "tokenizers", "numpy"]
    if python.exists() and all(_matches(v, wanted[n]) for n, v in installed_versions(python, list(wanted)).items()):
        print(f"    reusing {venv}: " + ", ".join(f"{n} {v}" for n, v in wanted.items()))
    else:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        command = [str(python), "-m", "pip", "install", "-c", str(CONSTRAINTS), *(f"{n}=={v}" for n, v in wanted.items())]
        print("    " + " ".join(command[2:]), flush=True)
        with log.open("w") as sink:
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"error: pip install into {venv} failed (exit {done.returncode}): {one_line(log.read_text())}; see {log}")
        wrong = {n: v for n, v in installed_versions(python, list(wanted)).items() if not _matches(v, wanted[n])}
        if wrong:
            raise SystemExit(f"error: {venv} holds {wrong} after pip install, not {wanted}")
    return {n: v for n, v in installed_versions(python, names).items() if v is not None}


# --- 2. sources and converts -------------------------------------------------------------------


def prose(text: str) -> list[str]:
    """The README's lines of prose: 40 characters or more, starting with a letter."""
    return [line.strip() for line in text.splitlines() if len(line.strip()) >= 40 and line.strip()[0].isalpha()]


def _tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_sources(folder: Path) -> dict[str, Path]:
    """The Llama and GPT-2 directories, the text files (README prose), the MiniLM directory and its sentences' files."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from actsparse_deploy.models import minilm

    hf_logging.disable_progress_bar()
    folder.mkdir(parents=True, exist_ok=True)
    lines = prose((ROOT / "README.md").read_text(encoding="utf-8"))
    tokenizer = _tokenizer(lines)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    configs = {
        "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **special)),
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128, **special)),
    }
    paths: dict[str, Path] = {}
    for name, (cls, config) in configs.items():
        torch.manual_seed(0)
        cls(config).eval().save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        paths[name] = folder / name
    texts = {"calib.txt": lines[0:128:2], "held.txt": lines[1:32:2],
             "minilm-calib.txt": minilm.english_sentences("calibration")[:64], "minilm-held.txt": minilm.english_sentences("heldout")[:32]}
    for name, chosen in texts.items():
        (folder / name).write_text("\n".join(chosen) + "\n", encoding="utf-8")
        paths[name] = folder / name
    paths["minilm"] = minilm.model_dir()
    return paths


def actsparse() -> list[str]:
    """This environment's ``actsparse`` command."""
    script = Path(sys.executable).parent / "actsparse"
    return [str(script)] if script.exists() else [sys.executable, "-m", "actsparse_deploy"]


def convert_command(case: Case, sources: dict[str, Path], out: Path) -> list[str]:
    args = [*actsparse(), "convert"]
    if case.source in ("llama", "gpt2"):
        args += [str(sources[case.source]), "--task", case.task, "--text", str(sources["calib.txt"]),
                 "--heldout-text", str(sources["held.txt"]), "--max-length", "32"]
    elif case.source == "minilm":
        args += [str(sources["minilm"]), "--task", case.task, "--text", str(sources["minilm-calib.txt"]),
                 "--heldout-text", str(sources["minilm-held.txt"]), "--max-length", "128"]
    else:
        args.append(case.source)
    return [*args, "-o", str(out), "--threads", "1", "--no-latency", "--overwrite"]


def convert(case: Case, sources: dict[str, Path], out: Path, reuse: bool) -> dict[str, Any]:
    """``actsparse convert`` of ``case`` into ``out`` (with ``reuse``, none where ``out`` has a report.json)."""
    command = convert_command(case, sources, out)
    shown = " ".join(Path(a).name if a == command[0] else a for a in command)
    if reuse and (out / "report.json").is_file():
        print(f"    {case.name}: reusing {out}")
        return {"command": shown, "exit": 0, "reused": True}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **ENV})
    seconds = round(time.perf_counter() - start, 1)
    print(f"    {case.name}: exit {done.returncode} in {seconds:.1f} s: {shown}", flush=True)
    result: dict[str, Any] = {"command": shown, "exit": done.returncode, "seconds": seconds}
    if done.returncode != 0:
        result["error"] = one_line(done.stderr)
        print(f"      {result['error']}")
    return result


# --- 3. our side: tokenizer ids, the encoders' outputs ------------------------------------------


def texts_for(case: Case, sources: dict[str, Path]) -> list[str]:
    """A few texts of the case's kind, of different lengths."""
    if case.source == "tiny-lm":
        from actsparse_deploy.models import tinylm

        return [t[:n] for t, n in zip(tinylm.split_texts("heldout")[:4], (300, 120, 40, 200))]
    if case.source == "minilm":
        from actsparse_deploy.models import minilm

        return minilm.english_sentences("heldout")[:8]
    return sources["held.txt"].read_text(encoding="utf-8").splitlines()[:4]


def our_side(case: Case, folder: Path, texts: list[str], refs: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our ``AutoTokenizer``'s check (the table's cell) and the child's job for ``case``'s folder: the ids,
    report.json's prompts and tokens (a decoder), or our onnxruntime outputs saved to ``refs`` (an encoder)."""
    import numpy as np

    job: dict[str, Any] = {"name": case.name, "folder": str(folder), "task": case.task, "loaders": list(case.loaders), "texts": texts}
    start = time.perf_counter()
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        job["ids"] = tokenizer(texts)["input_ids"]
        cell: dict[str, Any] = {"status": "works", "class": type(tokenizer).__name__, "texts": len(texts), "ids_equal": True}
    except Exception as e:  # the loader's own exception types: recorded as its cell
        tokenizer, cell = None, {"status": "error", "error": one_line(e)}
    cell["seconds"] = round(time.perf_counter() - start, 3)
    if case.task == "causal-lm":
        generation = json.loads((folder / "report.json").read_text())["validation"].get("generation")
        if generation is None:
            job["error"] = "report.json has no validation.generation (a decoder without a KV cache?)"
        else:
            job |= {k: generation[k] for k in ("prompt_ids", "tokens", "new_tokens")}
    elif tokenizer is None:
        job["error"] = f"no reference: our AutoTokenizer failed ({cell['error']})"
    else:
        batch = tokenizer(texts, padding=True, return_tensors="np")
        np.savez(refs, **run_onnx(folder / "model.onnx", {k: np.asarray(v) for k, v in batch.items()}))
        job["reference"] = str(refs)
    return cell, job


def run_onnx(path: Path, batch: dict[str, Any]) -> dict[str, Any]:
    """``model.onnx``'s outputs by name under onnxruntime (one thread), fed the inputs it has (zero ``token_type_ids``)."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {}
    for i in session.get_inputs():
        value = batch.get(i.name, np.zeros_like(batch["input_ids"]) if i.name == "token_type_ids" else None)
        if value is None:
            raise SystemExit(f"error: {path} takes {i.name}, which a tokenizer does not make")
        feed[i.name] = value.astype(np.int64)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


# --- 4. the loaders, in their environment; the verdicts -------------------------------------------


def run_child(venv: Path, jobs: list[dict[str, Any]], folder: Path, atol: float) -> dict[str, Any]:
    """The child's results by case and loader (its own log: ``folder/child.log``)."""
    spec, results, log = folder / "jobs.json", folder / "results.json", folder / "child.log"
    spec.write_text(json.dumps({"threads": 1, "atol": atol, "jobs": jobs}))
    results.unlink(missing_ok=True)
    with log.open("w") as sink:
        done = subprocess.run([str(venv / "bin" / "python"), str(CHILD), str(spec), str(results)], stdout=sink,
                              stderr=subprocess.STDOUT, env={**os.environ, **ENV})
    print(re.sub(r"^", "    ", log.read_text(), flags=re.M).rstrip())
    if done.returncode != 0 or not results.is_file():
        raise SystemExit(f"error: the loaders' check exited {done.returncode}: {one_line(log.read_text())}; see {log}")
    return json.loads(results.read_text())


def verdict(loader: str, cell: dict[str, Any], atol: float) -> dict[str, Any]:
    """``cell`` with ``status`` made ``differs`` where it loaded but gave something else than ours."""
    if cell.get("status") != "works":
        return cell
    why = None
    if loader == "tokenizer" and not cell.get("ids_equal"):
        why = "ids differ from ours"
    elif loader == "causal-lm" and not cell.get("tokens_equal"):
        why = f"tokens differ from our validation's at prompts {cell.get('differing')}"
    elif loader in ("feature-extraction", "sentence-transformer") and not cell.get("max_abs_diff", float("inf")) <= atol:
        why = f"max abs diff {cell.get('max_abs_diff')} > atol {atol}"
    return cell if why is None else {**cell, "status": "differs", "error": why}


def describe(loader: str, cell: dict[str, Any]) -> str:
    """The figures of a cell, in words."""
    if cell["status"] != "works":
        return cell.get("error", "")
    if cell.get("warnings"):
        return describe(loader, {**cell, "warnings": []}) + "; logged: " + " | ".join(cell["warnings"])
    if loader == "tokenizer":
        return f"{cell['class']}, same ids as ours on {cell['texts']} texts"
    if loader == "causal-lm":
        return (f"{cell['prompts']} prompts x {cell['new_tokens']} greedy tokens: identical to our validation's "
                f"(can_use_cache {cell['can_use_cache']}, is_merged {cell['is_merged']})")
    return f"max abs diff {cell['max_abs_diff']:.3g} over {cell['shape']}" + (f", modules {cell['modules']}" if "modules" in cell else "")


def table(run: Run) -> tuple[str, bool]:
    """The markdown table (task x loader: works / FAILS / -) and the details under it; whether every check passed."""
    rows = ["| folder | task | convert | " + " | ".join(LOADERS) + " |", "|" + "---|" * (3 + len(LOADERS))]
    details, passed = [], True
    for name, case in run.cases.items():
        conv = case["convert"]
        cells = ["works" if conv["exit"] == 0 else f"exit {conv['exit']}"]
        passed &= conv["exit"] == 0
        if conv["exit"] != 0:
            details.append(f"{name}: convert: {conv.get('error')}")
        for loader in LOADERS:
            cell = case["loaders"].get(loader)
            if cell is None:
                cells.append("-")
                continue
            passed &= cell["status"] == "works"
            cells.append("works" if cell["status"] == "works" else cell["status"].upper())
            key = next((k for k, v in CHILD_LOADERS.items() if v == loader), "tokenizer")
            details.append(f"{name}: {loader}: {cell['status']}: {describe(key, cell)} ({cell.get('seconds', 0):.2f} s)")
        rows.append(f"| {name} | {case['task']} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\n" + "\n".join(details), passed


def check_case(run: Run, case: Case, sources: dict[str, Path], reuse: bool) -> dict[str, Any] | None:
    """Steps 2 and 3 for one case: its result so far (``run.cases``) and the child's job (None: nothing to load)."""
    folder = run.out / case.name
    with run.step(f"convert {case.name}"):
        result: dict[str, Any] = {"source": case.source, "task": case.task, "folder": str(folder), "convert": convert(case, sources, folder, reuse),
                  "loaders": {}}
    run.cases[case.name] = result
    if result["convert"]["exit"] != 0:
        return None
    with run.step(f"our side {case.name}"):
        cell, job = our_side(case, folder, texts_for(case, sources), run.out / f"{case.name}-reference.npz")
    result["loaders"][LOADERS[0]] = cell
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-loaders", help="the loaders' virtual environment (made where missing)")
    parser.add_argument("--out", type=Path, help="where the sources and output folders go (default: a scratch folder, removed after)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--only", action="append", choices=[c.name for c in CASES], help="this case only (repeatable)")
    parser.add_argument("--reuse", action="store_true", help="no convert where OUT/NAME holds a report.json already")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest abs difference of the encoders' outputs from ours")
    args = parser.parse_args(argv)
    scratch = args.out is None
    out = Path(tempfile.mkdtemp(prefix="check-loaders-")) if scratch else args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(Run(out, args.atol), args, [c for c in CASES if not args.only or c.name in args.only])
    finally:
        if scratch:
            shutil.rmtree(out, ignore_errors=True)


def _run(run: Run, args: argparse.Namespace, cases: list[Case]) -> int:
    from transformers import __version__ as transformers_version

    ours: dict[str, str] = {"transformers": transformers_version, "onnxruntime": metadata.version("onnxruntime"),
                            "torch": metadata.version("torch"), "actsparse_deploy": metadata.version("actsparse_deploy")}
    run.versions["ours"] = ours
    with run.step("loaders' environment"):
        run.versions["loaders"] = ensure_venv(args.venv.resolve(), run.out / "pip.log")
    print("    ours: " + ", ".join(f"{k} {v}" for k, v in run.versions["ours"].items()))
    print("    loaders': " + ", ".join(f"{k} {v}" for k, v in run.versions["loaders"].items()))
    with run.step("sources"):
        sources = make_sources(run.out / "sources")
    jobs = [job for case in cases if (job := check_case(run, case, sources, args.reuse)) is not None]
    with run.step("loaders"):
        results = run_child(args.venv.resolve(), jobs, run.out, run.atol) if jobs else {}
    for name, by_loader in results.items():
        for loader, cell in by_loader.items():
            run.cases[name]["loaders"][CHILD_LOADERS[loader]] = verdict(loader, cell, run.atol)
    text, passed = table(run)
    print("\n" + text + "\n\nsteps: " + ", ".join(f"{k} {v:.1f} s" for k, v in run.steps.items()))
    print("all checks passed" if passed else "FAILED: see the rows above")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"passed": passed, "venv": str(args.venv.resolve()), "out": str(run.out), "atol": run.atol,
                                         "versions": run.versions, "steps": run.steps, "cases": run.cases}, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
