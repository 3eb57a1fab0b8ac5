"""Write tiny-lm token rows as a ``--data`` file: does more (or other) calibration text let the int8
budget search of tiny-lm go further? (issue 20's 0.35x)

Rows of ``SEQ_LEN`` tokens, spread evenly over their stream (``tinylm.token_rows``), from the calibration
split (every row: 154) and / or the training split (the text the model was trained on), saved as
``input_ids`` / ``attention_mask`` in a ``.safetensors`` file that ``convert --data`` reads; the held-out
split is never read. Then, for example:

    python tools/tiny_lm_rows.py --calibration --train 256 -o mix.safetensors
    actsparse convert tiny-lm --quantize int8 --max-cost perplexity-ratio=1.03 --threads 1 --data mix.safetensors -o out/mix --json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from actsparse_deploy.models import tinylm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", action="store_true", help="every row of the calibration split")
    parser.add_argument("--train", type=int, default=0, help="this many rows of the training split")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    parts = []
    if args.calibration:
        stream = tinylm.token_stream("calibration")
        parts.append(tinylm.token_rows(stream, len(stream) // tinylm.SEQ_LEN))
    if args.train:
        parts.append(tinylm.token_rows(tinylm.token_stream("train"), args.train))
    if not parts:
        parser.error("give --calibration, --train N or both")
    ids = torch.cat(parts).contiguous()
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(args.output))
    print(f"{args.output}: {ids.shape[0]} rows of {ids.shape[1]} tokens")


if __name__ == "__main__":
    main()
