"""Tiny user models the method cannot use as they are (or only with ``model.output``), for the tests of
the model check: ``model.arch = "tests.odd_models:<callable>"`` (the repository root is on the path).

Each is a conv-BN-ReLU stem, global average pooling and an ``nn.Linear`` head: 32x32 RGB in, 10
classes by default; only the point named by its callable differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TinyNet(nn.Module):
    """conv(3→4) - BN - ReLU - global average pool - Linear(4→num_classes); ``bn=False`` drops the BN."""

    def __init__(self, num_classes: int = 10, bn: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.relu(self.bn(self.conv(x))), 1).flatten(1)

    def forward(self, x: Tensor) -> Any:
        return self.head(self.features(x))


class Untraceable(TinyNet):
    """Python control flow on a tensor's value: eager mode runs it, torch.fx cannot trace it."""

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        if f.sum() > 0:
            f = f * 2
        return self.head(f)


class ForwardRaises(TinyNet):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("forward is not implemented for this input\nsecond line of the message")


class TwoOutputs(TinyNet):
    """Returns ``(logits, features)``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.head(f), f


class DictOutputs(TinyNet):
    """Returns ``{"features": ..., "logits": ...}``."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.features(x)
        return {"features": f, "logits": self.head(f)}


class ExtraDim(TinyNet):
    """Returns logits of shape [N, 1, num_classes]."""

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))[:, None]


class Noisy(TinyNet):
    """Draws from torch's global random generator in its forward (input noise of zero scale)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x + 0.0 * torch.rand_like(x)))


def tiny(num_classes: int = 10) -> nn.Module:
    return TinyNet(num_classes)


def noisy(num_classes: int = 10) -> nn.Module:
    return Noisy(num_classes)


def untraceable(num_classes: int = 10) -> nn.Module:
    return Untraceable(num_classes)


def raising(num_classes: int = 10) -> nn.Module:
    raise RuntimeError("cannot build the model: its config file is missing\nsecond line of the message")


def forward_raises(num_classes: int = 10) -> nn.Module:
    return ForwardRaises(num_classes)


def two_outputs(num_classes: int = 10) -> nn.Module:
    return TwoOutputs(num_classes)


def dict_outputs(num_classes: int = 10) -> nn.Module:
    return DictOutputs(num_classes)


def extra_dim(num_classes: int = 10) -> nn.Module:
    return ExtraDim(num_classes)


def no_batchnorm(num_classes: int = 10) -> nn.Module:
    return TinyNet(num_classes, bn=False)


def no_linear(num_classes: int = 10) -> nn.Module:
    """A 1x1-conv classifier: no nn.Linear, so no penultimate feature."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, num_classes, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def linear_only(num_classes: int = 10) -> nn.Module:
    """A single Linear on the flattened image: no activation feeds a weight layer (nothing for a_bits)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
