"""Checkpoint files: key-layout adaptation and the project's one checkpoint format.

It imports torch, :mod:`intraq_core.errors` and :mod:`intraq_core.torchfile` (whose
:func:`~intraq_core.torchfile.safe_load` reads every torch file), nothing else of the project.

* Key layouts of the two common CIFAR ResNet conventions are adapted to the model's own names:
  akamaster (head ``linear``, option-B shortcut ``shortcut.0/1``) and torchvision-style (e.g.
  chenyaofo's CIFAR ResNets: head ``fc``, shortcut ``downsample.0/1``). Loading is strict: any
  missing, unexpected or mis-shaped key raises :class:`CheckpointMismatchError` listing them,
  instead of silently leaving random weights.
* The project's checkpoint format (:data:`MODEL_CHECKPOINT_FORMAT`) stores
  ``{"format", "model_config", "quant_config", "state_dict", "extra"}`` in plain types and
  tensors only. A float model has ``quant_config`` None; a quantized student records its
  quantization config, so it is rebuilt as ``create_model`` → ``quantize`` → ``load_state_dict``.
  Files of the former student format (``intraq-student/1``, same fields) are still read.
"""

from __future__ import annotations

import io
import itertools
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from intraq_core.errors import CheckpointError, CheckpointMismatchError
from intraq_core.torchfile import safe_load

__all__ = [
    "MODEL_CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointMismatchError",
    "adapt_state_dict",
    "checkpoint_bytes",
    "checkpoint_payload",
    "extract_state_dict",
    "is_model_checkpoint",
    "load_state_dict_file",
    "load_weights",
    "read_model_checkpoint",
    "write_checkpoint",
]

MODEL_CHECKPOINT_FORMAT = "intraq-model/1"
_LEGACY_FORMATS = ("intraq-student/1",)
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _holds(obj: Any) -> str:
    """What a loaded checkpoint that is no state_dict holds, in words."""
    if isinstance(obj, Tensor):
        return f"a single tensor of shape {list(obj.shape)}"
    if isinstance(obj, Mapping):
        if not obj:
            return "an empty dict"
        keys = sorted(map(str, obj))
        shown = keys[:8] + (["..."] if len(keys) > 8 else [])
        if any(isinstance(v, Tensor) for v in obj.values()):
            key, value = next((k, v) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor)))
            kind = type(value).__name__
            article = "an" if kind[0] in "aeiou" else "a"
            return f"a dict of tensors mixed with other values ({key!r} is {article} {kind})"
        return f"a dict with the keys {shown}, none of them a dict of tensors"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} item(s), not a dict"
    return f"a {type(obj).__name__}, not a dict"


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The state_dict inside a loaded checkpoint (plain, or under a common wrapper key).

    ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are stripped.
    """
    state = obj
    if not _is_tensor_dict(state) and isinstance(obj, Mapping):
        state = next((obj[k] for k in _WRAPPER_KEYS if k in obj and _is_tensor_dict(obj[k])), None)
    if not _is_tensor_dict(state):
        raise CheckpointError(
            f"no state_dict found in {source}: it holds {_holds(obj)}; a state_dict is a dict of parameter names to "
            f"tensors (model.state_dict()), plain or under one of the keys {'/'.join(_WRAPPER_KEYS)}"
        )
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _strip_prefixes(key)
        if new in out:
            raise CheckpointError(f"duplicate key {new!r} in {source} after stripping prefixes")
        out[new] = value
    return out


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state_dict from a file with ``weights_only=True`` (CPU tensors, prefixes stripped)."""
    p = Path(path).expanduser()
    return extract_state_dict(safe_load(p), source=str(p))


def _variants(key: str) -> list[str]:
    """Spellings of ``key`` in the other layout: head ``fc``<->``linear``, ``downsample``<->``shortcut``."""
    parts = key.split(".")
    options: list[list[str]] = []
    for i, part in enumerate(parts):
        alt = [part]
        if i == 0 and part in ("fc", "linear"):
            alt.append("linear" if part == "fc" else "fc")
        if i > 0 and part in ("downsample", "shortcut"):
            alt.append("shortcut" if part == "downsample" else "downsample")
        options.append(alt)
    return [".".join(p) for p in itertools.product(*options)]


def adapt_state_dict(state_dict: Mapping[str, Tensor], model_keys: Iterable[str]) -> dict[str, Tensor]:
    """Rename keys to the model's layout where a key is absent but its other-layout spelling exists."""
    wanted = set(model_keys)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        target = key
        if key not in wanted:
            target = next((v for v in _variants(key) if v in wanted and v not in state_dict), key)
        if target in out:  # two spellings of one key: keep the first, report the second
            target = key
        out[target] = value
    return out


def _hints(
    model_sd: Mapping[str, Tensor],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> list[str]:
    """Likely causes of a mismatch (wrong shortcut option, wrong number of classes)."""
    hints = []
    has_shortcut = any(".shortcut." in k or ".downsample." in k for k in model_sd)
    if any(".shortcut." in k or ".downsample." in k for k in unexpected) and not has_shortcut:
        hints.append("the checkpoint has shortcut convolutions: use shortcut 'B'")
    if any(".shortcut." in k or ".downsample." in k for k in missing) and not any(
        ".shortcut." in k or ".downsample." in k for k in unexpected
    ):
        hints.append("the checkpoint has no shortcut parameters: use shortcut 'A'")
    last_keys = list(model_sd)[-2:]
    for key, ck_shape, model_shape in mismatched:
        if key in last_keys and ck_shape[1:] == model_shape[1:]:
            hints.append(f"the checkpoint's classifier has {ck_shape[0]} classes: set num_classes")
            break
    return hints


def load_weights(model: nn.Module, state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike[str]) -> nn.Module:
    """Strictly load a state_dict (or a checkpoint file) into ``model``, adapting key layouts.

    Absent ``num_batches_tracked`` buffers are tolerated; anything else that does not fit
    raises CheckpointMismatchError. Returns ``model``.
    """
    if isinstance(state_dict_or_path, Mapping):
        source = None
        state = extract_state_dict(state_dict_or_path, source="state_dict")
    else:
        source = str(state_dict_or_path)
        state = load_state_dict_file(state_dict_or_path)
    model_sd = model.state_dict()
    state = adapt_state_dict(state, model_sd)
    missing = [k for k in model_sd if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in model_sd]
    mismatched = [
        (k, tuple(v.shape), tuple(model_sd[k].shape))
        for k, v in state.items()
        if k in model_sd and v.shape != model_sd[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            missing,
            unexpected,
            mismatched,
            model_name=type(model).__name__,
            source=source,
            hints=_hints(model_sd, missing, unexpected, mismatched),
        )
    model.load_state_dict(state, strict=True)
    return model


def _plain(obj: Any, where: str, allow_tensors: bool) -> Any:
    """Deep copy into types that ``torch.load(weights_only=True)`` reads back."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}.{k}", allow_tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", allow_tensors) for i, v in enumerate(obj)]
    if allow_tensors and isinstance(obj, Tensor):
        return obj.detach().cpu()
    raise TypeError(f"{where} has a {type(obj).__name__}; only plain types can be stored in a checkpoint")


def checkpoint_payload(
    state_dict: Mapping[str, Tensor],
    model_config: Mapping[str, Any],
    *,
    quant_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint as plain types and CPU tensors (what :func:`safe_load` reads back).

    ``model_config`` should be resolved (architecture, classes, input size, normalization), so the
    file describes itself; its ``weights`` is cleared because the weights are in the file.
    Raises TypeError when ``extra`` (or a config) holds an object that is not a plain type.
    """
    stored = _plain(dict(model_config), "model_config", allow_tensors=False)
    stored["weights"] = None
    return {
        "format": MODEL_CHECKPOINT_FORMAT,
        "model_config": stored,
        "quant_config": None if quant_config is None else _plain(dict(quant_config), "quant_config", False),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "extra": _plain(dict(extra or {}), "extra", allow_tensors=True),
    }


def checkpoint_bytes(
    state_dict: Mapping[str, Tensor],
    model_config: Mapping[str, Any],
    *,
    quant_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """:func:`checkpoint_payload` serialized with ``torch.save`` (for object storage)."""
    buf = io.BytesIO()
    torch.save(checkpoint_payload(state_dict, model_config, quant_config=quant_config, extra=extra), buf)
    return buf.getvalue()


def write_checkpoint(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, Tensor],
    model_config: Mapping[str, Any],
    *,
    quant_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write :func:`checkpoint_payload` to ``path`` atomically (a temp file, then a rename)."""
    payload = checkpoint_payload(state_dict, model_config, quant_config=quant_config, extra=extra)
    dest = Path(path).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp_name)
        os.replace(tmp_name, dest)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return dest


def read_model_checkpoint(source: str | os.PathLike[str] | bytes) -> dict[str, Any]:
    """Load a project checkpoint (a path, memory-mapped, or its bytes) and check its format.

    Returns ``{"format", "model_config", "quant_config", "state_dict", "extra"}``; ``quant_config``
    is None for a float model. Raises CheckpointError for any other kind of file.
    """
    name = "checkpoint" if isinstance(source, bytes) else str(Path(source).expanduser())
    obj = safe_load(source, mmap=True)
    formats = (MODEL_CHECKPOINT_FORMAT, *_LEGACY_FORMATS)
    if not isinstance(obj, Mapping) or obj.get("format") not in formats:
        raise CheckpointError(
            f"{name} is not an intraq-pipeline model checkpoint (no 'format': '{MODEL_CHECKPOINT_FORMAT}')"
        )
    if not isinstance(obj.get("model_config"), Mapping) or not _is_tensor_dict(obj.get("state_dict")):
        raise CheckpointError(f"{name} is a malformed model checkpoint (model_config/state_dict missing)")
    quant = obj.get("quant_config")
    if quant is not None and not isinstance(quant, Mapping):
        raise CheckpointError(f"{name} is a malformed model checkpoint (quant_config is not a mapping)")
    return {
        "format": obj["format"],
        "model_config": dict(obj["model_config"]),
        "quant_config": None if quant is None else dict(quant),
        "state_dict": dict(obj["state_dict"]),
        "extra": dict(obj.get("extra") or {}),
    }


def is_model_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file in the project's checkpoint format (a float model or a student)."""
    p = Path(path).expanduser()
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        read_model_checkpoint(p)
    except CheckpointError:
        return False
    return True
