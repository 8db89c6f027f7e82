"""The model spec (:class:`ModelConfig`): which classifier, its input size, normalization and preprocessing;
the normalization constants of the common datasets and the ImageNet evaluation convention."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from intraq_core.config.stage import StageConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: The ImageNet evaluation convention: resize the shorter side to image_size / 0.875 (256 for 224),
#: then centre-crop image_size.
IMAGENET_CROP_PCT = 0.875
#: Inputs of at most this many pixels (CIFAR's 32, Tiny ImageNet's 64) are used at their size: no
#: resize unless the model spec asks for one.
SMALL_INPUT_MAX = 64
#: The largest plausible mean / std of pixels on the [0, 1] scale (any mean of [0, 1] data is at most
#: 1 and any std at most 0.5; "std 1" is the identity normalization). Values on the 0-255 scale
#: (ImageNet's 123.7 / 58.4) are far beyond, which is the mistake these catch.
MAX_PLAUSIBLE_MEAN = 1.5
MAX_PLAUSIBLE_STD = 2.0
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def preprocessing_spec(crop_pct: Any, interpolation: Any) -> dict[str, Any]:
    """``crop_pct`` / ``interpolation`` of a timm-style ``pretrained_cfg``, keeping only values this
    project reproduces (a ratio in (0, 1]; bilinear, bicubic or nearest)."""
    out: dict[str, Any] = {}
    if isinstance(crop_pct, (int, float)) and 0.0 < float(crop_pct) <= 1.0:
        out["crop_pct"] = float(crop_pct)
    if interpolation in INTERPOLATIONS:
        out["interpolation"] = interpolation
    return out


def default_crop_pct(image_size: int | None) -> float | None:
    """The crop ratio of a model spec that names none: ImageNet's 0.875 above 64 pixels, else no resize."""
    if image_size is None or image_size <= SMALL_INPUT_MAX:
        return None
    return IMAGENET_CROP_PCT


class ModelConfig(StageConfig):
    """Which classifier to build and how its inputs are normalized: the model spec.

    ``arch`` is a registry name (``cifar_resnet20``, ``torchvision:resnet18``), ``timm:<name>``
    (optional extra), an import path ``package.module:callable`` returning an ``nn.Module``
    (called with ``kwargs``), or the path of a checkpoint written by this project (which
    records its own architecture). ``weights`` is a state_dict file (plain, or under
    ``state_dict``/``model``; always loaded weights-only), a named asset (``cifar10-resnet20``),
    ``torchvision:<TAG>`` / ``timm:<TAG>`` published weights, or None (random initialization,
    seeded so that every process builds the same network; only useful for tests).
    ``mean``/``std`` are the input normalization the weights were trained with (RGB in
    [0, 1], then ``(x - mean) / std``): left as None they are taken from
    the weights' metadata, then the checkpoint, then the architecture's default, so set them
    for a checkpoint of your own; values beyond the [0, 1] scale (mean > 1.5, std > 2: the 0-255
    statistics) are refused. ``shortcut`` (CIFAR ResNets) left as None is read off the
    checkpoint's keys. ``output`` is for a model whose forward returns several things (a
    tuple/list, e.g. ``(logits, features)``, or a dict): the index (tuple/list) or key (dict) of
    its logits; the model is then wrapped so that everything downstream sees the logits only.

    Preprocessing of real images (test sets; ``intraq_core.data``): the shorter side is resized
    to ``resize`` pixels (or ``floor(image_size / crop_pct)``, timm's convention; give one of the
    two) with ``interpolation``, then the centre ``image_size`` × ``image_size`` is cropped. Left
    unset they come from the weights' metadata (torchvision's resize size, timm's ``crop_pct``
    and ``interpolation``), a ``pretrained_cfg`` on an imported callable, the checkpoint, else
    ImageNet's convention for inputs above 64 pixels (crop_pct 0.875: 256 -> 224, bilinear) and
    no resize at all for small inputs (CIFAR's 32: images must already be that size).
    """

    arch: str = "cifar_resnet20"
    weights: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    num_classes: int | None = Field(default=None, ge=2)
    shortcut: Literal["A", "B"] | None = None
    image_size: int | None = Field(default=None, ge=8)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    output: int | str | None = None
    resize: int | None = Field(default=None, ge=1)
    crop_pct: float | None = Field(default=None, gt=0.0, le=1.0)
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # "--set model.mean=0.49,0.48,0.45" arrives as a string.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.strip("()[] ").split(","))
        return value

    @model_validator(mode="after")
    def _check_std(self) -> ModelConfig:
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("model.std must be positive")
        for key, bound in (("mean", MAX_PLAUSIBLE_MEAN), ("std", MAX_PLAUSIBLE_STD)):
            value = getattr(self, key)
            if value is not None and any(v > bound for v in value):
                scaled = ",".join(f"{v / 255:.4g}" for v in value)
                raise ValueError(
                    f"model.{key}={list(value)} is beyond the [0, 1] scale of the inputs (RGB in [0, 1]); statistics "
                    f"on the 0-255 scale must be divided by 255 (model.{key}={scaled})"
                )
        if self.resize is not None and self.crop_pct is not None:
            raise ValueError("give model.resize or model.crop_pct, not both (resize = floor(image_size / crop_pct))")
        if self.resize is not None and self.image_size is not None and self.resize < self.image_size:
            raise ValueError(
                f"model.resize={self.resize} is smaller than model.image_size={self.image_size}: the shorter side is "
                "resized to model.resize before the centre crop of image_size"
            )
        return self

    @property
    def resize_size(self) -> int | None:
        """The shorter side (pixels) real images are resized to before the centre crop; None: no resize."""
        if self.resize is not None:
            return self.resize
        crop_pct = self.crop_pct if self.crop_pct is not None else default_crop_pct(self.image_size)
        if crop_pct is None or self.image_size is None:
            return None
        # timm's rule (floor); the epsilon keeps a ratio like 224/232 from landing on 231.
        return math.floor(self.image_size / crop_pct + 1e-6)

    @property
    def resize_interpolation(self) -> str:
        """The interpolation of the resize (bilinear unless the spec says otherwise)."""
        return self.interpolation or "bilinear"
