"""Models built by a user's callable: ``model.arch = "package.module:callable"``.

The callable (a function or a class) is imported from ``sys.path`` (so from ``PYTHONPATH``) and
called with ``model.kwargs``, plus ``num_classes=model.num_classes`` when it accepts a
``num_classes`` argument that the kwargs do not set. It must return an ``nn.Module``.

What the pipeline needs to know about the model that a state_dict does not say (input size,
normalization, classes) comes from, in order: the config (``model.image_size``, ``model.mean``,
``model.std``, ``model.num_classes``), then a ``pretrained_cfg`` or ``default_cfg`` dict on the
callable or on the model it returns (timm's convention: ``input_size`` (C, H, W), ``mean``,
``std``, ``num_classes``, ``crop_pct``, ``interpolation``), then, for ``num_classes`` only, the
output size of the model's last ``nn.Linear``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from intraq_core.config import preprocessing_spec
from intraq_core.errors import ModelError, UnknownModelError, first_line

__all__ = [
    "build_imported_model",
    "declared_spec",
    "head_classes",
    "import_callable",
    "imported_defaults",
    "is_import_path",
    "local_source",
]

_IMPORT_PATH = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
_CFG_ATTRS = ("pretrained_cfg", "default_cfg")
_PROJECT_PACKAGES = ("intraq_core", "pipeline")  # installed on every node with the project itself


def is_import_path(arch: str) -> bool:
    """Whether ``arch`` has the form ``package.module:callable``."""
    return _IMPORT_PATH.match(arch) is not None


def import_callable(arch: str) -> Callable[..., Any]:
    """The callable named by ``package.module:callable``, with one-line errors for each failure."""
    match = _IMPORT_PATH.match(arch)
    if match is None:
        raise UnknownModelError(f"model.arch '{arch}' is not of the form package.module:callable")
    module_name, attr = match["module"], match["attr"]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise UnknownModelError(
                f"model.arch '{arch}': no module named '{missing}' (put the directory that holds it on PYTHONPATH)"
            ) from None
        raise ModelError(f"model.arch '{arch}': importing {module_name} failed: {exc}") from exc
    except Exception as exc:
        raise ModelError(f"model.arch '{arch}': importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownModelError(f"model.arch '{arch}': {getattr(obj, '__name__', obj)} has no '{part}'{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model.arch '{arch}' names a {type(obj).__name__}, not a callable that builds a model")
    return obj


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def head_classes(model: nn.Module) -> tuple[str, int] | None:
    """Name and output size of the model's last ``nn.Linear`` (module order), None without one."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module.out_features)
    return last


def build_imported_model(arch: str, kwargs: Mapping[str, Any], num_classes: int | None) -> nn.Module:
    """Call the callable of ``arch`` with ``kwargs`` (and ``num_classes`` if it takes it); check the result."""
    fn = import_callable(arch)
    call = dict(kwargs)
    if num_classes is not None and "num_classes" not in call and _accepts(fn, "num_classes"):
        call["num_classes"] = num_classes
    shown = ", ".join(f"{k}={v!r}" for k, v in call.items())
    try:
        inspect.signature(fn).bind(**call)
    except TypeError as exc:
        raise ModelError(f"model.arch '{arch}' cannot be called with ({shown}): {exc}; fix model.kwargs") from None
    except ValueError:  # no signature to check against: let the call itself tell
        pass
    try:
        model = fn(**call)
    except Exception as exc:  # the user's code: any failure is theirs to fix, told in one line
        raise ModelError(
            f"model.arch '{arch}': calling it with ({shown}) raised {type(exc).__name__}: {first_line(exc)}; "
            "fix the callable or model.kwargs"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.arch '{arch}' returned a {type(model).__name__}, not a torch.nn.Module")
    head = head_classes(model)
    if num_classes is not None and head is not None and head[1] != num_classes:
        raise ModelError(
            f"model.arch '{arch}' built a classifier whose last nn.Linear '{head[0]}' has {head[1]} outputs, "
            f"but model.num_classes={num_classes}: pass num_classes through model.kwargs or leave "
            "model.num_classes unset"
        )
    return model


def declared_spec(obj: Any) -> dict[str, Any]:
    """num_classes / image_size / mean / std / crop_pct / interpolation declared in a
    ``pretrained_cfg``/``default_cfg`` of ``obj``."""
    for attr in _CFG_ATTRS:
        cfg = getattr(obj, attr, None)
        if cfg is None:
            continue
        get = cfg.get if isinstance(cfg, Mapping) else lambda key, c=cfg: getattr(c, key, None)
        out: dict[str, Any] = {}
        if get("num_classes"):
            out["num_classes"] = int(get("num_classes"))
        size = get("input_size") or get("image_size")
        if size:
            out["image_size"] = int(size[-1]) if isinstance(size, (list, tuple)) else int(size)
        for key in ("mean", "std"):
            value = get(key)
            if value is not None:
                out[key] = tuple(float(v) for v in value)
        return {**out, **preprocessing_spec(get("crop_pct"), get("interpolation"))}
    return {}


def imported_defaults(arch: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of an imported model: what its callable declares, else what a probe build tells.

    A probe model (built with ``kwargs`` only) is made when the callable declares nothing about
    the classes: its own ``pretrained_cfg``/``default_cfg`` and its last ``nn.Linear`` fill the gaps.
    """
    fn = import_callable(arch)
    out = declared_spec(fn)
    if "num_classes" not in out:
        probe = build_imported_model(arch, kwargs, None)
        out = {**declared_spec(probe), **out}
        head = head_classes(probe)
        if "num_classes" not in out and head is not None:
            out["num_classes"] = head[1]
    return out


def local_source(arch: str) -> Path | None:
    """The local file or package directory that holds the top-level module of ``arch``, if it is user code.

    Installed packages (site-packages, the standard library) return None: every node of a cluster
    has them. User code does not, so the pipeline ships this path to Ray workers (``py_modules``).
    """
    match = _IMPORT_PATH.match(arch)
    if match is None:
        return None
    top = match["module"].split(".", 1)[0]
    if top in _PROJECT_PACKAGES:
        return None
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return None
    origin = Path(spec.origin).resolve()
    installed = [Path(p).resolve() for p in sys.path if p and ("site-packages" in p or "dist-packages" in p)]
    stdlib = Path(inspect.getfile(inspect)).resolve().parent
    if any(origin.is_relative_to(root) for root in [*installed, stdlib]):
        return None
    return origin.parent if spec.submodule_search_locations else origin
