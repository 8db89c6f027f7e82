"""MobileNetV1 (Howard et al., 2017) with LeakyReLU, in the layout of the RetinaFace backbone.

Depthwise-separable convolutions (a 3x3 depthwise conv + BN + activation, then a 1x1 pointwise
conv + BN + activation) after a 3x3 stride-2 stem, grouped as ``stage1`` (stem and five
blocks), ``stage2`` (six blocks) and ``stage3`` (two blocks), then global average pooling and
one ``fc`` Linear. The state-dict keys are those of the ImageNet pretrain of the
RetinaFace-MobileNet0.25 backbone (asset ``imagenet-mobilenetv1-025``): a real ImageNet-1k
network that is not a torchvision model, with LeakyReLU(0.1) after every BN.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MobileNetV1", "mobilenet_v1"]

#: (output channels at width 1.0, stride) of the 13 depthwise-separable blocks, by stage.
_STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1)),
    ((512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1)),
    ((1024, 2), (1024, 1)),
)


def _conv_bn_act(cin: int, cout: int, kernel: int, stride: int, groups: int, slope: float) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(slope, inplace=True),
    ]


class MobileNetV1(nn.Module):
    """MobileNetV1 at ``width`` (channels x width), LeakyReLU(``slope``), ``num_classes`` outputs."""

    def __init__(self, num_classes: int = 1000, width: float = 0.25, slope: float = 0.1) -> None:
        super().__init__()
        stem = max(8, int(32 * width))
        stages: list[nn.Sequential] = []
        cin = stem
        for s, blocks in enumerate(_STAGES):
            layers: list[nn.Module] = [nn.Sequential(*_conv_bn_act(3, stem, 3, 2, 1, slope))] if s == 0 else []
            for channels, stride in blocks:
                cout = int(channels * width)
                dw = _conv_bn_act(cin, cin, 3, stride, cin, slope)
                pw = _conv_bn_act(cin, cout, 1, 1, 1, slope)
                layers.append(nn.Sequential(*dw, *pw))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.stage1, self.stage2, self.stage3 = stages
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.avg(x).flatten(1))


def mobilenet_v1(num_classes: int = 1000, width: float = 0.25, slope: float = 0.1) -> MobileNetV1:
    """A MobileNetV1 (see :class:`MobileNetV1`)."""
    return MobileNetV1(num_classes, width, slope)
