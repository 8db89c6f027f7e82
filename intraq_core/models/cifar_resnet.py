"""CIFAR ResNets of He et al. (2015), depth 6n+2, with the akamaster module names.

The layout (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,shortcut}``,
``linear``) matches the akamaster checkpoints after stripping ``module.``. For the
quantizer every ReLU is its own ``nn.ReLU`` module and the residual add is a plain ``+``,
so activations can be found by module type and the model is ``torch.fx``-traceable.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CIFAR_RESNET_DEPTHS", "BasicBlock", "CifarResNet", "PadShortcut", "cifar_resnet"]

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)

Shortcut = Literal["A", "B"]


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling, then zero channels on both sides (no parameters)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ``relu1`` after ``bn1``, ``relu2`` after the residual add."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: Shortcut = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = PadShortcut(planes)
            elif option == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            else:
                raise ValueError(f"shortcut option must be 'A' or 'B', got {option!r}")
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, strides 1/2/2, avg pool, ``linear``."""

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: Shortcut = "A") -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, n >= 1 (e.g. 20, 32, 56, 110), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut option must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.shortcut_option = shortcut
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._make_layer(16, 16, n, 1, shortcut)
        self.layer2 = self._make_layer(16, 32, n, 2, shortcut)
        self.layer3 = self._make_layer(32, 64, n, 2, shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int, option: Shortcut) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride, option)]
        layers += [BasicBlock(planes, planes, 1, option) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.linear(x)


def cifar_resnet(depth: int, num_classes: int = 10, shortcut: Shortcut = "A") -> CifarResNet:
    """Build a randomly initialized (Kaiming, as akamaster) CIFAR ResNet."""
    return CifarResNet(depth=depth, num_classes=num_classes, shortcut=shortcut)
