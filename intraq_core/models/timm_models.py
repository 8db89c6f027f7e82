"""timm classifiers as ``timm:<name>`` (an optional extra: ``pip install 'intraq-pipeline[timm]'``).

Published weights are selected with ``ModelConfig.weights = "timm:DEFAULT"`` (the model's
default pretrained tag) or ``"timm:<tag>"`` (e.g. ``timm:a1_in1k`` for ``resnet18.a1_in1k``).
timm DOWNLOADS them from the Hugging Face Hub into its cache (``$HF_HOME``, default
``~/.cache/huggingface``) the first time; offline machines must pre-populate that cache or give a
local state_dict as ``model.weights``. Reading a tag's metadata (classes, input size,
normalization) never downloads. timm itself is imported only when a ``timm:`` model is used.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from intraq_core.config import IMAGENET_MEAN, IMAGENET_STD, preprocessing_spec
from intraq_core.errors import ModelError, UnknownModelError

__all__ = [
    "TIMM_PREFIX",
    "build_timm_model",
    "check_timm_model",
    "parse_timm_weights",
    "timm_defaults",
    "timm_weights_metadata",
]

TIMM_PREFIX = "timm:"
_INSTALL_HINT = "timm models need the optional dependency timm: pip install 'intraq-pipeline[timm]'"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ModelError(_INSTALL_HINT) from None
    return timm


def parse_timm_weights(weights: str | None) -> str | None:
    """The tag of ``timm:<TAG>`` weights, or None when ``weights`` is something else."""
    if weights is not None and weights.startswith(TIMM_PREFIX):
        tag = weights[len(TIMM_PREFIX) :]
        if not tag:
            raise ValueError("empty timm weights tag; use e.g. 'timm:DEFAULT'")
        return tag
    return None


def check_timm_model(name: str) -> None:
    """UnknownModelError (with the closest names) unless timm knows the architecture ``name``."""
    timm = _timm()
    if "." in name:
        raise UnknownModelError(
            f"'timm:{name}': name the architecture only and the pretrained tag in the weights "
            f"(model.arch=timm:{name.split('.', 1)[0]}, model.weights=timm:{name.split('.', 1)[1]})"
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(TIMM_PREFIX + c) for c in close)}?" if close else ""
        raise UnknownModelError(f"timm has no model '{name}'{hint}")


def _pretrained_cfg(name: str, tag: str | None) -> Any:
    from timm.models import get_pretrained_cfg

    full = name if tag in (None, "DEFAULT") else f"{name}.{tag}"
    try:
        cfg = get_pretrained_cfg(full)
    except RuntimeError:  # "Invalid pretrained tag"
        cfg = None
    if cfg is None and tag not in (None, "DEFAULT"):
        tags = [t.split(".", 1)[1] for t in _timm().list_pretrained(f"{name}.*")]
        listed = ", ".join(tags) if tags else "none"
        raise ValueError(f"unknown timm weights '{tag}' for {name}; available: {listed}")
    return cfg


def _metadata(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg is None:
        return out
    if getattr(cfg, "num_classes", None):
        out["num_classes"] = int(cfg.num_classes)
    size = getattr(cfg, "input_size", None)
    if size:
        out["image_size"] = int(size[-1])
    mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    if mean is not None and len(mean) == 3 and std is not None and len(std) == 3:
        out["mean"] = tuple(float(v) for v in mean)
        out["std"] = tuple(float(v) for v in std)
    return {**out, **preprocessing_spec(getattr(cfg, "crop_pct", None), getattr(cfg, "interpolation", None))}


def timm_defaults(name: str) -> dict[str, Any]:
    """Defaults of a randomly initialized timm model: its default pretrained config, else ImageNet."""
    return {
        "num_classes": 1000,
        "image_size": 224,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        **_metadata(_pretrained_cfg(name, None)),
    }


def timm_weights_metadata(name: str, tag: str) -> dict[str, Any]:
    """num_classes, image_size, mean, std, crop_pct, interpolation of published weights (read from timm,
    no download; timm's centre crop mode is the one reproduced)."""
    cfg = _pretrained_cfg(name, tag)
    if cfg is None:
        raise ValueError(f"timm model '{name}' has no published weights")
    return {"arch": f"{TIMM_PREFIX}{name}", **_metadata(cfg)}


def build_timm_model(
    name: str, num_classes: int, weights: str | None = None, kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """Build ``name``; ``weights`` is ``timm:<TAG>`` (downloads if not cached) or None (random)."""
    timm = _timm()
    tag = parse_timm_weights(weights)
    if tag is None:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **(kwargs or {}))
    published = timm_weights_metadata(name, tag).get("num_classes")
    if published is not None and published != num_classes:
        raise ValueError(f"timm weights '{tag}' of {name} have {published} classes, but num_classes={num_classes}")
    full = name if tag == "DEFAULT" else f"{name}.{tag}"
    return timm.create_model(full, pretrained=True, num_classes=num_classes, **(kwargs or {}))
