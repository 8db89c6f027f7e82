"""torchvision classifiers as ``torchvision:<name>`` (resnet18, resnet50, mobilenet_v2, ...).

Published weights are selected with ``ModelConfig.weights = "torchvision:<TAG>"``
(``torchvision:DEFAULT``, ``torchvision:IMAGENET1K_V1``, ...) and loaded through
torchvision's weights API. That API DOWNLOADS the file into the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``) when it is not there yet, and
checks its hash; offline machines must pre-populate that cache. Reading the metadata of a
weights tag (classes, crop size, normalization) never downloads.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from intraq_core.config import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "TORCHVISION_PREFIX",
    "build_torchvision_model",
    "parse_torchvision_weights",
    "torchvision_defaults",
    "torchvision_model_names",
    "torchvision_weights_metadata",
]

TORCHVISION_PREFIX = "torchvision:"
_DEFAULT_SIZES = {"inception_v3": 299}


def torchvision_model_names() -> list[str]:
    """Names of torchvision's image classification models (without the prefix)."""
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def parse_torchvision_weights(weights: str | None) -> str | None:
    """The tag of ``torchvision:<TAG>`` weights, or None when ``weights`` is something else."""
    if weights is not None and weights.startswith(TORCHVISION_PREFIX):
        tag = weights[len(TORCHVISION_PREFIX) :]
        if not tag:
            raise ValueError("empty torchvision weights tag; use e.g. 'torchvision:DEFAULT'")
        return tag
    return None


def _weights_enum(name: str, tag: str) -> Any:
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"torchvision model '{name}' has no published weights") from exc
    try:
        return enum.verify(tag)
    except (KeyError, ValueError):
        tags = ", ".join(enum.__members__)
        raise ValueError(f"unknown torchvision weights '{tag}' for {name}; available: {tags}") from None


def torchvision_weights_metadata(name: str, tag: str) -> dict[str, Any]:
    """num_classes, image_size, mean, std, crop_pct, interpolation of published weights (read from
    torchvision, no download)."""
    weights = _weights_enum(name, tag)
    transforms = weights.transforms()
    crop, resize = int(transforms.crop_size[0]), int(transforms.resize_size[0])
    return {
        "arch": f"{TORCHVISION_PREFIX}{name}",
        "num_classes": len(weights.meta["categories"]),
        "image_size": crop,
        "mean": tuple(float(v) for v in transforms.mean),
        "std": tuple(float(v) for v in transforms.std),
        # As a ratio (crop / resize), so that an explicit model.image_size keeps the weights' ratio.
        "crop_pct": crop / resize,
        "interpolation": transforms.interpolation.value,
    }


def torchvision_defaults(name: str) -> dict[str, Any]:
    """Defaults of a randomly initialized torchvision classifier: ImageNet, 1000 classes."""
    return {
        "num_classes": 1000,
        "image_size": _DEFAULT_SIZES.get(name, 224),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }


def build_torchvision_model(
    name: str, num_classes: int, weights: str | None = None, kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """Build ``name`` (``kwargs`` go to its builder, e.g. ``width_mult``); ``weights`` is
    ``torchvision:<TAG>`` (downloads if not cached) or None."""
    from torchvision.models import get_model

    tag = parse_torchvision_weights(weights)
    if tag is None:
        return get_model(name, weights=None, num_classes=num_classes, **(kwargs or {}))
    enum = _weights_enum(name, tag)
    n = len(enum.meta["categories"])
    if num_classes != n:
        raise ValueError(f"torchvision weights {enum} have {n} classes, but num_classes={num_classes}")
    return get_model(name, weights=enum, **(kwargs or {}))
