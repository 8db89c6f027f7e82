"""Model registry: architecture names -> builders, config resolution, ``create_model``.

``ModelConfig.arch`` is one of

* a registered name: ``cifar_resnet{20,32,44,56,110}``, ``mobilenet_v1_025`` (MobileNetV1 x0.25
  with LeakyReLU, weights ``imagenet-mobilenetv1-025``), ``torchvision:<name>`` for every
  torchvision classifier (torchvision is imported when one is asked for or listed, not before:
  with the torch._dynamo it pulls in it took ~1.8 s of every process's start-up, ~0.3 s in one that
  builds a torch optimizer, which imports torch._dynamo anyway), or
  anything added with :func:`register_model`;
* ``timm:<name>`` for any timm model (optional extra, see :mod:`intraq_core.models.timm_models`);
* ``package.module:callable``: a user's function or class returning an ``nn.Module``, called with
  ``model.kwargs`` (see :mod:`intraq_core.models.imported`);
* the path of a checkpoint written by :func:`save_model_checkpoint` (it records its own
  architecture and normalization).

A model whose forward returns a tuple/list/dict is wrapped by :func:`create_model` so that it
returns the element ``model.output`` names (see :mod:`intraq_core.models.output`).

Unset config fields are filled in this order: explicit config values, then the metadata
of the weights (a named asset, a file whose sha256 is a registered asset's, or a
``torchvision:<TAG>`` / ``timm:<TAG>`` weights tag), then what the checkpoint's keys tell (a
CIFAR ResNet's shortcut option and classes), then the project checkpoint's ``model_config``,
then the architecture's defaults. The preprocessing of real images (``resize``/``crop_pct``,
``interpolation``) follows the same order and ends with the rule for the input size
(:func:`intraq_core.config.default_crop_pct`).
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

import torch
from torch import Tensor, nn

from intraq_core.assets import asset_metadata_for, resolve_asset
from intraq_core.config import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, ModelConfig, default_crop_pct
from intraq_core.errors import CheckpointError, UnknownModelError
from intraq_core.models.checkpoint import load_state_dict_file, load_weights, read_model_checkpoint, write_checkpoint
from intraq_core.models.cifar_resnet import CIFAR_RESNET_DEPTHS, cifar_resnet
from intraq_core.models.imported import (
    build_imported_model,
    declared_spec,
    import_callable,
    imported_defaults,
    is_import_path,
)
from intraq_core.models.mobilenet_v1 import mobilenet_v1
from intraq_core.models.output import SelectOutput
from intraq_core.models.timm_models import (
    TIMM_PREFIX,
    build_timm_model,
    check_timm_model,
    parse_timm_weights,
    timm_defaults,
    timm_weights_metadata,
)
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
    "save_model_checkpoint",
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
_PREPROCESSING = ("resize", "crop_pct", "interpolation")
#: Seed of the initialization when ``model.weights`` is None (the same network in every process).
RANDOM_INIT_SEED = 0
_HUB_PREFIXES = (TORCHVISION_PREFIX, TIMM_PREFIX)


@dataclass(frozen=True)
class ModelSpec:
    """An architecture: builder (given the resolved config) and where its unset fields come from.

    ``defaults`` holds num_classes, image_size, mean, std (and shortcut); ``defaults_for(cfg)``
    computes them instead when they depend on the config (an imported callable's kwargs).
    ``shortcut`` tells whether the architecture takes the CIFAR-ResNet shortcut option.
    ``weights_prefix`` (``torchvision:``, ``timm:``) names the published weights it accepts and
    ``weights_metadata(tag)`` describes them. ``from_state_dict(state)`` reads fields off a
    checkpoint's keys and shapes. ``kwargs`` tells whether ``model.kwargs`` reaches the builder.
    """

    name: str
    builder: Builder
    defaults: Mapping[str, Any] = field(default_factory=dict)
    shortcut: bool = False
    weights_metadata: Callable[[str], dict[str, Any]] | None = None
    weights_prefix: str | None = None
    defaults_for: Callable[[ModelConfig], Mapping[str, Any]] | None = None
    from_state_dict: Callable[[Mapping[str, Tensor]], dict[str, Any]] | None = None
    kwargs: bool = True


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    shortcut: bool = False,
    weights_metadata: Callable[[str], dict[str, Any]] | None = None,
    weights_prefix: str | None = None,
    from_state_dict: Callable[[Mapping[str, Tensor]], dict[str, Any]] | None = None,
    kwargs: bool = True,
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(cfg: ModelConfig) -> nn.Module`` under ``name``.

    ``defaults`` may hold num_classes, image_size, mean, std (and shortcut); fields
    without a default must then be given in the config. The builder reads ``cfg.kwargs``
    for any extra arguments (pass ``kwargs=False`` to refuse them).
    """

    def decorator(builder: Builder) -> Builder:
        _REGISTRY[name] = ModelSpec(
            name,
            builder,
            dict(defaults or {}),
            shortcut,
            weights_metadata,
            weights_prefix,
            None,
            from_state_dict,
            kwargs,
        )
        return builder

    return decorator


def list_models() -> list[str]:
    """All registered architecture names, sorted (``timm:<name>`` and import paths also work)."""
    return sorted({*_REGISTRY, *(f"{TORCHVISION_PREFIX}{name}" for name in torchvision_model_names())})


def _build_timm(name: str, cfg: ModelConfig) -> nn.Module:
    assert cfg.num_classes is not None
    return build_timm_model(name, cfg.num_classes, cfg.weights, dict(cfg.kwargs))


def _build_imported(arch: str, cfg: ModelConfig) -> nn.Module:
    return build_imported_model(arch, cfg.kwargs, cfg.num_classes)


def _hub_spec(
    name: str,
    prefix: str,
    build: Callable[[str, ModelConfig], nn.Module],
    defaults: Callable[[str], Mapping[str, Any]],
    metadata: Callable[[str, str], dict[str, Any]],
) -> ModelSpec:
    """The spec of ``<prefix><model>`` from a model hub (torchvision, timm): its builder, defaults and
    published weights' metadata, each for that model."""
    model = name[len(prefix) :]
    return ModelSpec(
        name,
        partial(build, model),
        defaults(model),
        weights_metadata=partial(metadata, model),
        weights_prefix=prefix,
    )


def get_model_spec(name: str) -> ModelSpec:
    """The spec of ``name`` (registered, ``timm:``, or an import path); UnknownModelError suggests names."""
    spec = _REGISTRY.get(name)
    if spec is not None:
        return spec
    if name.startswith(TORCHVISION_PREFIX) and name[len(TORCHVISION_PREFIX) :] in torchvision_model_names():
        return _hub_spec(
            name, TORCHVISION_PREFIX, _build_torchvision, torchvision_defaults, torchvision_weights_metadata
        )
    if name.startswith(TIMM_PREFIX):
        check_timm_model(name[len(TIMM_PREFIX) :])
        return _hub_spec(name, TIMM_PREFIX, _build_timm, timm_defaults, timm_weights_metadata)
    if is_import_path(name) and not name.startswith(TORCHVISION_PREFIX):
        return ModelSpec(
            name,
            partial(_build_imported, name),
            defaults_for=lambda cfg: imported_defaults(name, cfg.kwargs),
        )
    names = list_models()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    prefixed = f"{TORCHVISION_PREFIX}{name}"
    if prefixed in names and prefixed not in close:
        close.insert(0, prefixed)
    hint = f"did you mean {', '.join(repr(c) for c in close[:3])}? " if close else ""
    raise UnknownModelError(
        f"unknown model architecture '{name}' (neither a registered model nor an existing checkpoint file, "
        f"timm:<name> or an importable package.module:callable); {hint}see list_models() for the "
        f"{len(names)} registered names"
    )


def _project_checkpoint(path: Path) -> dict[str, Any] | None:
    """The project checkpoint at ``path`` (config, quant config), None if it is another kind of file."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        return read_model_checkpoint(path)
    except CheckpointError:
        return None


def _refuse_student(ckpt: Mapping[str, Any], path: Path) -> None:
    if ckpt.get("quant_config") is not None:
        raise CheckpointError(
            f"{path} is a quantized student, not a float model: evaluate it with `intraq-pipeline evaluate "
            "--weights` or load it with intraq_core.load_student"
        )


def _hub_weights(weights: str | None) -> tuple[str, str] | None:
    """``(prefix, tag)`` of published-weights tags (``torchvision:<TAG>``, ``timm:<TAG>``), else None."""
    for prefix, parse in ((TORCHVISION_PREFIX, parse_torchvision_weights), (TIMM_PREFIX, parse_timm_weights)):
        tag = parse(weights)
        if tag is not None:
            return prefix, tag
    return None


def _weights_file(weights: str | None) -> Path | None:
    """The local file of ``weights`` when it is a path (asset names are not resolved: no download)."""
    if weights is None or _hub_weights(weights) is not None:
        return None
    path = Path(weights).expanduser()
    return path if path.is_file() else None


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """A copy of ``cfg`` with num_classes, shortcut (CIFAR only), image_size, mean, std and the
    preprocessing (resize or crop_pct, interpolation; None for small inputs that are not resized) filled.

    When ``arch`` is a project checkpoint, the copy's ``arch`` is the recorded architecture
    and its ``weights`` the checkpoint (unless weights were given); its ``output`` is the
    recorded one unless one was given. Never downloads.
    """
    arch, weights, kwargs = cfg.arch, cfg.weights, dict(cfg.kwargs)
    ckpt_cfg: dict[str, Any] = {}
    if arch not in _REGISTRY and Path(arch).expanduser().is_file():
        ckpt_path = Path(arch).expanduser()
        ckpt = read_model_checkpoint(ckpt_path)
        _refuse_student(ckpt, ckpt_path)
        ckpt_cfg = dict(ckpt["model_config"])
        arch = str(ckpt_cfg.get("arch"))
        kwargs = {**dict(ckpt_cfg.get("kwargs") or {}), **kwargs}
        weights = weights if weights is not None else str(ckpt_path)
    hub = _hub_weights(weights)
    asset_meta = (asset_metadata_for(weights) or {}) if hub is None else {}
    if not ckpt_cfg and "arch" not in cfg.model_fields_set:
        # Weights that are a named asset say which architecture they belong to.
        arch = str(asset_meta.get("arch") or arch)
    spec = get_model_spec(arch)

    weights_meta: dict[str, Any] = {}
    from_keys: dict[str, Any] = {}
    if hub is not None:
        prefix, tag = hub
        if spec.weights_metadata is None or spec.weights_prefix != prefix:
            raise ValueError(f"weights '{weights}' are {prefix.rstrip(':')} weights, but arch '{arch}' is not")
        weights_meta = spec.weights_metadata(tag)
    else:
        weights_meta = asset_meta
        path = _weights_file(weights)
        if path is not None:
            ckpt = _project_checkpoint(path) if not ckpt_cfg else None
            if ckpt is not None:
                _refuse_student(ckpt, path)
                ckpt_cfg = dict(ckpt["model_config"])
            elif spec.from_state_dict is not None and not ckpt_cfg:
                from_keys = spec.from_state_dict(load_state_dict_file(path))

    if cfg.shortcut is not None and not spec.shortcut:
        raise ValueError(f"shortcut applies only to CIFAR ResNets, not to '{arch}'")
    if kwargs and not spec.kwargs:
        raise ValueError(f"model.kwargs does not apply to '{arch}' (its options are model.* keys)")
    explicit = {name: getattr(cfg, name) for name in _FILLED}
    values: dict[str, Any] = {}
    computed: list[Mapping[str, Any]] = []

    def defaults() -> Mapping[str, Any]:
        """The architecture's defaults (computed once: an imported callable may build a probe model)."""
        if not computed:
            probe = cfg.model_copy(update={"arch": arch, "kwargs": kwargs})
            computed.append({**spec.defaults, **(spec.defaults_for(probe) if spec.defaults_for else {})})
        return computed[0]

    for name in _FILLED:
        if name == "shortcut" and not spec.shortcut:
            values[name] = None
            continue
        layers = (explicit[name], weights_meta.get(name), from_keys.get(name), ckpt_cfg.get(name))
        value = next((v for v in layers if v is not None), None)
        if value is None:
            value = defaults().get(name)
        if value is None:
            raise ValueError(
                f"model '{arch}' has no default for {name}; set model.{name} explicitly"
                + (" (or declare it in a pretrained_cfg dict on the callable)" if spec.defaults_for else "")
            )
        values[name] = value

    def declared() -> Mapping[str, Any]:
        """The defaults for the preprocessing: without building a probe model that nothing else needed
        (an imported callable's own pretrained_cfg only), so that a fully specified model is built once."""
        if computed or spec.defaults_for is None:
            return defaults()
        return {**spec.defaults, **declared_spec(import_callable(arch))}

    values.update(_preprocessing(cfg, (weights_meta, ckpt_cfg), declared, values["image_size"]))
    output = cfg.output if cfg.output is not None else ckpt_cfg.get("output")
    return ModelConfig.model_validate({"arch": arch, "weights": weights, "kwargs": kwargs, **values, "output": output})


def _preprocessing(
    cfg: ModelConfig, layers: tuple[Mapping[str, Any], ...], defaults: Callable[[], Mapping[str, Any]], size: int
) -> dict[str, Any]:
    """resize / crop_pct / interpolation of the resolved spec: the first layer that sets the resize
    (explicit config, weights metadata, checkpoint, the architecture's defaults), else the rule for
    the input size (:func:`default_crop_pct`); the interpolation likewise (bilinear when resizing)."""
    explicit = {k: getattr(cfg, k) for k in _PREPROCESSING}
    found = [explicit, *layers]
    rule = next((layer for layer in found if any(layer.get(k) is not None for k in ("resize", "crop_pct"))), None)
    interpolation = next((layer["interpolation"] for layer in found if layer.get("interpolation") is not None), None)
    if rule is None or interpolation is None:
        arch_defaults = defaults()
        rule = rule if rule is not None else arch_defaults
        interpolation = interpolation or arch_defaults.get("interpolation")
    out = {"resize": rule.get("resize"), "crop_pct": rule.get("crop_pct")}
    if out["resize"] is None and out["crop_pct"] is None:
        out["crop_pct"] = default_crop_pct(size)
    resizes = out["resize"] is not None or out["crop_pct"] is not None
    out["interpolation"] = interpolation or ("bilinear" if resizes else None)
    return out


def create_model(cfg: ModelConfig | str, **overrides: Any) -> nn.Module:
    """Build the model of ``cfg`` (an arch name or ModelConfig), load its weights, set eval mode.

    Weights given as an asset name are resolved (and downloaded once) via ``resolve_asset``;
    ``torchvision:<TAG>`` / ``timm:<TAG>`` weights go through those libraries' weights APIs.
    With ``model.output`` set, the loaded model is wrapped in :class:`SelectOutput` (its forward
    returns that element of the model's tuple/list/dict).

    Example:
        >>> model = create_model("cifar_resnet20", num_classes=100)
        >>> model.linear.out_features
        100
    """
    if isinstance(cfg, str):
        cfg = ModelConfig.model_validate({"arch": cfg, **overrides})
    elif overrides:
        cfg = ModelConfig.model_validate({**cfg.model_dump(), **overrides})
    resolved = resolve_model_config(cfg)
    builder = get_model_spec(resolved.arch).builder
    if resolved.weights is None:
        # Random weights are seeded, so every process (generation actors, Train workers, the
        # evaluation) builds the same teacher; the caller's RNG state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = builder(resolved)
    else:
        model = builder(resolved)
        if _hub_weights(resolved.weights) is None:
            load_weights(model, resolve_asset(resolved.weights))
    if resolved.output is not None:
        model = SelectOutput(model, resolved.output)
    return model.eval()


def model_from_checkpoint(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model saved with ``save_model_checkpoint`` (eval mode)."""
    p = Path(path).expanduser()
    read_model_checkpoint(p)  # clear error if it is not a project checkpoint
    return create_model(ModelConfig(arch=str(p)))


def save_model_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    model_config: Mapping[str, Any] | ModelConfig,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a float model in the project's checkpoint format, atomically; returns the path.

    ``model_config`` (a dict or ModelConfig) is resolved so the file records its
    architecture, classes and normalization; its ``weights`` is cleared because the
    weights are in the file. Such a file can be used as ``ModelConfig.arch``. A
    :class:`SelectOutput` wrapper is not saved: the file holds the wrapped model's weights (which
    ``create_model`` loads before wrapping) and records ``output``.
    """
    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.model_validate(model_config)
    resolved = resolve_model_config(cfg)
    inner = model
    if isinstance(model, SelectOutput):
        inner = model.model
        if resolved.output is None:
            resolved = resolved.model_copy(update={"output": model.output})
    return write_checkpoint(path, inner.state_dict(), resolved.model_dump(mode="json"), extra=extra)


def cifar_from_state_dict(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Shortcut option and classes of a CIFAR ResNet state_dict (either key layout).

    Option B has parameters on the shortcut (``shortcut.*`` or ``downsample.*`` keys), option A
    has none; the classes are the rows of the head's weight (``linear`` or ``fc``).
    """
    out: dict[str, Any] = {"shortcut": "B" if any(".shortcut." in k or ".downsample." in k for k in state) else "A"}
    for head in ("linear.weight", "fc.weight"):
        if head in state and state[head].dim() == 2:
            out["num_classes"] = int(state[head].shape[0])
            break
    return out


def _build_cifar(depth: int, cfg: ModelConfig) -> nn.Module:
    assert cfg.num_classes is not None and cfg.shortcut is not None
    return cifar_resnet(depth, num_classes=cfg.num_classes, shortcut=cfg.shortcut)


def _build_torchvision(name: str, cfg: ModelConfig) -> nn.Module:
    assert cfg.num_classes is not None
    return build_torchvision_model(name, cfg.num_classes, cfg.weights, dict(cfg.kwargs))


def _build_mobilenet_v1(width: float, cfg: ModelConfig) -> nn.Module:
    assert cfg.num_classes is not None
    return mobilenet_v1(cfg.num_classes, width, float(cfg.kwargs.get("slope", 0.1)))


def _register_builtins() -> None:
    register_model(
        "mobilenet_v1_025",
        defaults={"num_classes": 1000, "image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    )(partial(_build_mobilenet_v1, 0.25))
    for depth in CIFAR_RESNET_DEPTHS:
        register_model(
            f"cifar_resnet{depth}",
            defaults=CIFAR_DEFAULTS,
            shortcut=True,
            from_state_dict=cifar_from_state_dict,
            kwargs=False,
        )(partial(_build_cifar, depth))


_register_builtins()
