"""Model registry: architecture names -> builders, config resolution, ``create_model``.

Built-in names: ``cifar_resnet{20,32,44,56,110}`` and ``torchvision:<name>`` for every
torchvision classifier. ``ModelConfig.arch`` may also be the path of a checkpoint written
by ``save_model_checkpoint`` (it records its own architecture and normalization).

Unset config fields are filled in this order: explicit config values, then the metadata
of the weights (a named asset, a file whose sha256 is a registered asset's, or a
``torchvision:<TAG>`` weights tag), then the project checkpoint's ``model_config``, then
the architecture's defaults.
"""

from __future__ import annotations

import difflib
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from intraq_core.assets import asset_metadata_for, resolve_asset
from intraq_core.config import CIFAR10_MEAN, CIFAR10_STD, ModelConfig
from intraq_core.models.checkpoint import CheckpointError, load_weights, read_model_checkpoint
from intraq_core.models.cifar_resnet import CIFAR_RESNET_DEPTHS, cifar_resnet
from intraq_core.models.torchvision_models import (
    TORCHVISION_PREFIX,
    build_torchvision_model,
    parse_torchvision_weights,
    torchvision_defaults,
    torchvision_model_names,
    torchvision_weights_metadata,
)

__all__ = [
    "CIFAR_DEFAULTS",
    "ModelSpec",
    "UnknownModelError",
    "create_model",
    "get_model_spec",
    "list_models",
    "model_from_checkpoint",
    "register_model",
    "resolve_model_config",
]

Builder = Callable[[ModelConfig], nn.Module]

CIFAR_DEFAULTS: dict[str, Any] = {
    "num_classes": 10,
    "shortcut": "A",
    "image_size": 32,
    "mean": CIFAR10_MEAN,
    "std": CIFAR10_STD,
}
_FILLED = ("num_classes", "shortcut", "image_size", "mean", "std")


class UnknownModelError(ValueError):
    """``arch`` is neither a registered model nor a project checkpoint file."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: builder (given the resolved config) and default fields.

    ``shortcut`` tells whether the architecture takes the CIFAR-ResNet shortcut option;
    ``weights_metadata(tag)`` describes ``torchvision:<tag>`` weights when supported.
    """

    name: str
    builder: Builder
    defaults: Mapping[str, Any] = field(default_factory=dict)
    shortcut: bool = False
    weights_metadata: Callable[[str], dict[str, Any]] | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    shortcut: bool = False,
    weights_metadata: Callable[[str], dict[str, Any]] | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(cfg: ModelConfig) -> nn.Module`` under ``name``.

    ``defaults`` may hold num_classes, image_size, mean, std (and shortcut); fields
    without a default must then be given in the config.
    """

    def decorator(builder: Builder) -> Builder:
        _REGISTRY[name] = ModelSpec(name, builder, dict(defaults or {}), shortcut, weights_metadata)
        return builder

    return decorator


def list_models() -> list[str]:
    """All registered architecture names, sorted."""
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; UnknownModelError suggests the closest names."""
    spec = _REGISTRY.get(name)
    if spec is not None:
        return spec
    names = list_models()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    prefixed = f"{TORCHVISION_PREFIX}{name}"
    if prefixed in _REGISTRY and prefixed not in close:
        close.insert(0, prefixed)
    hint = f"did you mean {', '.join(repr(c) for c in close[:3])}? " if close else ""
    raise UnknownModelError(
        f"unknown model architecture '{name}' (neither a registered model nor an existing checkpoint "
        f"file); {hint}see list_models() for the {len(names)} registered names"
    )


def _project_checkpoint_config(path: Path) -> dict[str, Any] | None:
    """model_config of a project checkpoint at ``path``, None if it is another kind of file."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        return dict(read_model_checkpoint(path)["model_config"])
    except CheckpointError:
        return None


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """A copy of ``cfg`` with num_classes, shortcut (CIFAR only), image_size, mean, std filled.

    When ``arch`` is a project checkpoint, the copy's ``arch`` is the recorded architecture
    and its ``weights`` the checkpoint (unless weights were given). Never downloads.
    """
    arch, weights = cfg.arch, cfg.weights
    ckpt_cfg: dict[str, Any] = {}
    if arch not in _REGISTRY and Path(arch).expanduser().is_file():
        ckpt_path = Path(arch).expanduser()
        ckpt_cfg = dict(read_model_checkpoint(ckpt_path)["model_config"])
        arch = str(ckpt_cfg.get("arch"))
        weights = weights if weights is not None else str(ckpt_path)
    spec = get_model_spec(arch)

    tag = parse_torchvision_weights(weights)
    if tag is not None:
        if spec.weights_metadata is None:
            raise ValueError(f"weights '{weights}' are torchvision weights, but arch '{arch}' is not")
        weights_meta = spec.weights_metadata(tag)
    else:
        weights_meta = asset_metadata_for(weights) or {}
        if not ckpt_cfg and weights is not None:
            ckpt_cfg = _project_checkpoint_config(Path(weights).expanduser()) or {}

    if cfg.shortcut is not None and not spec.shortcut:
        raise ValueError(f"shortcut applies only to CIFAR ResNets, not to '{arch}'")
    values: dict[str, Any] = {}
    for name in _FILLED:
        if name == "shortcut" and not spec.shortcut:
            values[name] = None
            continue
        explicit = getattr(cfg, name)
        layers = (weights_meta.get(name), ckpt_cfg.get(name), spec.defaults.get(name))
        value = explicit if explicit is not None else next((v for v in layers if v is not None), None)
        if value is None:
            raise ValueError(f"model '{arch}' has no default for {name}; set model.{name} explicitly")
        values[name] = value
    return ModelConfig.model_validate({"arch": arch, "weights": weights, **values})


def create_model(cfg: ModelConfig | str, **overrides: Any) -> nn.Module:
    """Build the model of ``cfg`` (an arch name or ModelConfig), load its weights, set eval mode.

    Weights given as an asset name are resolved (and downloaded once) via ``resolve_asset``;
    ``torchvision:<TAG>`` weights go through torchvision's weights API.
    """
    if isinstance(cfg, str):
        cfg = ModelConfig.model_validate({"arch": cfg, **overrides})
    elif overrides:
        cfg = ModelConfig.model_validate({**cfg.model_dump(), **overrides})
    resolved = resolve_model_config(cfg)
    model = get_model_spec(resolved.arch).builder(resolved)
    if resolved.weights is not None and parse_torchvision_weights(resolved.weights) is None:
        load_weights(model, resolve_asset(resolved.weights))
    return model.eval()


def model_from_checkpoint(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model saved with ``save_model_checkpoint`` (eval mode)."""
    p = Path(path).expanduser()
    read_model_checkpoint(p)  # clear error if it is not a project checkpoint
    return create_model(ModelConfig(arch=str(p)))


def _build_cifar(depth: int, cfg: ModelConfig) -> nn.Module:
    assert cfg.num_classes is not None and cfg.shortcut is not None
    return cifar_resnet(depth, num_classes=cfg.num_classes, shortcut=cfg.shortcut)


def _build_torchvision(name: str, cfg: ModelConfig) -> nn.Module:
    assert cfg.num_classes is not None
    return build_torchvision_model(name, cfg.num_classes, cfg.weights)


def _register_builtins() -> None:
    for depth in CIFAR_RESNET_DEPTHS:
        register_model(f"cifar_resnet{depth}", defaults=CIFAR_DEFAULTS, shortcut=True)(partial(_build_cifar, depth))
    for name in torchvision_model_names():
        register_model(
            f"{TORCHVISION_PREFIX}{name}",
            defaults=torchvision_defaults(name),
            weights_metadata=partial(torchvision_weights_metadata, name),
        )(partial(_build_torchvision, name))


_register_builtins()
