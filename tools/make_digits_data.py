"""Write models/digits.npz: scikit-learn's bundled 8x8 digits (1797 images,
pixel values 0-16, and their labels) as uint8 arrays, so the built-in digits
models read their data without importing scikit-learn (0.6 s per process).

    python tools/make_digits_data.py            # writes models/digits.npz
    python tools/make_digits_data.py --check    # compares the file with load_digits()
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "models" / "digits.npz"


def arrays() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = np.asarray(digits.data)
    if not (np.array_equal(data, np.round(data)) and data.min() >= 0 and data.max() <= 16):
        raise SystemExit("load_digits() pixels are not integers in 0..16: the uint8 file would not hold them exactly")
    return {"images": data.astype(np.uint8), "target": np.asarray(digits.target).astype(np.uint8)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare models/digits.npz with load_digits() instead of writing it")
    args = parser.parse_args(argv)
    wanted = arrays()
    if args.check:
        with np.load(OUT, allow_pickle=False) as shipped:
            same = set(shipped.files) == set(wanted) and all(np.array_equal(shipped[k], v) for k, v in wanted.items())
        print("models/digits.npz matches load_digits()" if same else "models/digits.npz differs from load_digits()")
        return 0 if same else 1
    np.savez_compressed(OUT, **wanted)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
