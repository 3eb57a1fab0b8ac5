"""A user's own model: ``build()`` returns the ``nn.Module``; its weights come
from ``--weights model.safetensors`` (``make_data.py`` trains and writes them).

An 8x8-digit classifier: an input projection, an encoder of two residual MLP
blocks (``encoder.0.fc1`` ... ``encoder.1.fc2``), a head.

    >>> import torch
    >>> build()(torch.zeros(3, 64)).shape
    torch.Size([3, 10])
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """``x + fc2(relu(fc1(x)))``: fc2's input is the hidden features a mask removes."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class Classifier(nn.Module):
    def __init__(self, pixels: int = 64, width: int = 32, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(pixels, width)
        self.encoder = nn.ModuleList([Block(width, hidden), Block(width, hidden)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for block in self.encoder:
            h = block(h)
        return self.head(h)


def build() -> Classifier:
    """The model, freshly initialised (seeded): ``--weights`` gives it its trained weights."""
    torch.manual_seed(0)
    return Classifier()
