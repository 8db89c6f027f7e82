"""The CLI's options, each defined once, and the options ``run``, ``generate`` and ``train`` share.

``--config``, ``--set``, ``--storage``, ``--cluster``, ``--arch``/``--weights`` (shortcuts for
``--set model.arch=…``/``--set model.weights=…``), ``--resume``, ``--overwrite``, ``--repair`` and
``--quiet`` mean the same for every command that runs a run; :func:`run_options` gives a command all
of them as one :class:`RunOptions`, and :func:`load_config` turns them into a ``RunConfig``.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, get_type_hints

import typer

from pipeline.errors import UsageError

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="YAML run config (a path, or a shipped name like 'smoke')."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set generate.iterations=200."),
]
StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", "--output", "-o", help="Run location: a local dir, file://, s3://bucket/prefix."),
]
ClusterOpt = Annotated[
    str | None, typer.Option("--cluster", help="Ray cluster-launcher YAML to run on (default: a local Ray).")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run at this location.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the run at this location.")]
RepairOpt = Annotated[
    bool,
    typer.Option(
        "--repair",
        help="Continue the run and regenerate only the synthetic shards that fail validation "
        "(truncated, wrong schema or shape, NaN/Inf, checksum mismatch).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Model (= --set model.arch=…): cifar_resnet20, torchvision:resnet18, timm:resnet18, "
        "package.module:callable, or a checkpoint written by a run.",
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="Teacher weights (= --set model.weights=…): a state_dict file, an asset name, torchvision:/timm:<TAG>.",
    ),
]


def yaml_string(text: str) -> str:
    """``text`` quoted for a ``--set`` value, so ``null``, ``1e3`` or ``a: b`` stay strings."""
    return json.dumps(text)


def load_config(
    config: str | None,
    sets: list[str] | None,
    storage: str | None,
    cluster: str | None,
    *,
    arch: str | None = None,
    weights: str | None = None,
    base: dict[str, Any] | None = None,
) -> Any:
    """The ``RunConfig`` of a command's options: ``--arch``/``--weights`` and ``--storage`` as the
    ``--set`` overrides they stand for, before the command's own ``--set``; a ``--cluster`` file is
    validated (connecting happens in the stage)."""
    from pipeline.config import load_run_config

    shortcuts = {"model.arch": arch, "model.weights": weights}
    overrides = [f"{key}={yaml_string(value)}" for key, value in shortcuts.items() if value is not None]
    overrides += sets or []
    if storage is not None:
        overrides.append(f"storage.url={storage}")
    cfg = load_run_config(config, overrides, base=base)
    if cluster is not None:
        from pipeline.ray.cluster import load_cluster_config

        load_cluster_config(cluster)
    return cfg


@dataclass(frozen=True)
class RunOptions:
    """The options of ``run``, ``generate`` and ``train``."""

    config: ConfigOpt = None
    set_: SetOpt = None
    storage: StorageOpt = None
    cluster: ClusterOpt = None
    arch: ArchOpt = None
    weights: WeightsOpt = None
    resume: ResumeOpt = False
    overwrite: OverwriteOpt = False
    repair: RepairOpt = False
    quiet: QuietOpt = False

    def load(self) -> Any:
        """The run config these options describe (:func:`load_config`)."""
        return load_config(self.config, self.set_, self.storage, self.cluster, arch=self.arch, weights=self.weights)


def run_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command(opts: RunOptions, **its own options)`` as a typer command taking every option of
    :class:`RunOptions` first, then its own."""
    hints = get_type_hints(RunOptions, include_extras=True)
    shared = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in fields(RunOptions)
    ]
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in list(inspect.signature(command, eval_str=True).parameters.values())[1:]
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        opts = RunOptions(**{p.name: kwargs.pop(p.name) for p in shared})
        return command(opts, **kwargs)

    wrapper.__signature__ = inspect.Signature([*shared, *own], return_annotation=None)  # type: ignore[attr-defined]
    return wrapper


def parse_bits(bits: str) -> tuple[int, int]:
    """``W4A4`` → (4, 4), checked against ``quant.w_bits``/``quant.a_bits``'s range before any work."""
    import re

    from intraq_core.config import QuantConfig
    from pipeline.config import validate_section

    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", bits.strip())
    if not m:
        raise UsageError(f"--bits must look like W4A4, got '{bits}'")
    w_bits, a_bits = int(m.group(1)), int(m.group(2))
    validate_section(QuantConfig, {"w_bits": w_bits, "a_bits": a_bits}, source=f"--bits {bits}")
    return w_bits, a_bits


def check_calib_images(calib_images: int) -> None:
    """``--calib-images`` is the calibration set's ``limit``: the same range, one line before any work."""
    from intraq_core.config import EvalConfig
    from pipeline.config import validate_section

    validate_section(EvalConfig, {"limit": calib_images}, source="--calib-images", prefix="", names={"limit": ""})


def parse_floats(text: str | None, name: str) -> tuple[float, float, float] | None:
    """``--mean``/``--std``: three comma-separated numbers (None when not given)."""
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{name} expects three comma-separated numbers, got '{text}'") from None
    if len(vals) != 3:
        raise UsageError(f"{name} expects three comma-separated numbers, got '{text}'")
    return vals  # type: ignore[return-value]
