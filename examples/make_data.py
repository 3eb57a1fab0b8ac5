"""Make the example's files from scikit-learn's bundled 8x8 digits (no download),
in the current directory: ``model.safetensors`` (``my_pkg.models:build`` trained
on 1197 images), ``calib.npz`` (200 images to calibrate on) and ``heldout.npz``
with ``heldout-labels.npy`` (400 other images and their classes). The inputs are
stored under ``x``, the name of the model's ``forward`` argument.

    cd examples && python make_data.py

Deterministic: a fixed split and seed, one thread; about two seconds.
"""

from __future__ import annotations

import numpy as np
import torch
from my_pkg.models import build
from safetensors.torch import save_file
from sklearn.datasets import load_digits

SPLIT = {"train": 1197, "calib": 200, "heldout": 400}


def splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    digits = load_digits()
    images = (np.asarray(digits.data) / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(images))
    out, start = {}, 0
    for name, count in SPLIT.items():
        taken = order[start : start + count]
        out[name] = (images[taken], np.asarray(digits.target)[taken].astype(np.int64))
        start += count
    return out


def train(x: np.ndarray, y: np.ndarray, epochs: int = 300) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    torch.set_num_threads(1)
    data = splits()
    model = train(*data["train"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "model.safetensors")
    np.savez("calib.npz", x=data["calib"][0])
    np.savez("heldout.npz", x=data["heldout"][0])
    np.save("heldout-labels.npy", data["heldout"][1])
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(data["heldout"][0])).argmax(-1).numpy() == data["heldout"][1]).mean()
    print(f"wrote model.safetensors (held-out accuracy {accuracy:.4f}), calib.npz, heldout.npz, heldout-labels.npy")


if __name__ == "__main__":
    main()
