"""What a tune search may try, checked before Ray starts: the space, the objective's guard, every trial's batch.

The space (``tune.space``): dotted config keys → ``[low, high]``. Loss weights (``*_weight``,
``kd_alpha``) and learning rates (``lr``) are sampled log-uniformly (when ``low > 0``); margins,
ε, areas, temperatures uniformly; integer fields as integers. A bad key, a bound that is no valid
value of its key, a validation objective on the evaluation test set, or a batch that does not fit a
trial's images at the extremes of the space is refused in one line (:func:`check_tune`, run once by
the CLI before the log file and Ray).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, deep_merge, nest_dotted, parse_overrides, validate_run_config
from pipeline.stages.train import check_batch

__all__ = ["check_objective", "check_trial_batches", "check_tune", "extreme", "search_space", "trial_config"]

_LOG_KEYS = ("kd_alpha", "lr")


def trial_config(base: RunConfig | dict[str, Any], params: dict[str, Any]) -> RunConfig:
    """``base`` with the dotted ``params`` applied and validated (the config a trial runs)."""
    data = base.to_dict() if isinstance(base, RunConfig) else dict(base)
    return validate_run_config(deep_merge(data, nest_dotted(params)))


def _field_type(dotted: str) -> Any:
    """The annotation of a dotted config key (ConfigError for unknown keys)."""
    parse_overrides([f"{dotted}=0"])  # unknown keys raise ConfigError with a suggestion
    cls: Any = RunConfig
    annotation: Any = None
    for part in dotted.split("."):
        annotation = cls.model_fields[part].annotation
        cls = annotation
    return annotation


def _is_int_field(annotation: Any) -> bool:
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    kinds = {a for a in args if a is not type(None)}
    return kinds == {int}


def _is_float_field(annotation: Any) -> bool:
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    kinds = {a for a in args if a is not type(None)}
    return bool(kinds) and kinds <= {int, float} and float in kinds


def search_space(cfg: RunConfig) -> dict[str, Any]:
    """``tune.space`` as Tune sampling domains (ConfigError for bad keys or ranges)."""
    from ray import tune

    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: give at least one key, e.g. generate.bns_weight: [0.1, 10]")
    space: dict[str, Any] = {}
    for key, bounds in cfg.tune.space.items():
        annotation = _field_type(key)
        if len(bounds) != 2 or not bounds[0] <= bounds[1]:
            raise ConfigError(f"tune.space.{key}: expected [low, high] with low <= high, got {bounds}")
        low, high = float(bounds[0]), float(bounds[1])
        name = key.rsplit(".", 1)[-1]
        if _is_int_field(annotation):
            if low != int(low) or high != int(high):
                raise ConfigError(f"tune.space.{key}: {name} is an integer; give integer bounds")
            space[key] = tune.randint(int(low), int(high) + 1)
        elif not _is_float_field(annotation):
            raise ConfigError(f"tune.space.{key}: only numeric keys can be searched ({name} is not)")
        elif low == high:
            space[key] = low
        elif (name.endswith("_weight") or name in _LOG_KEYS) and low > 0:
            space[key] = tune.loguniform(low, high)
        else:
            space[key] = tune.uniform(low, high)
        # Fail now, not in a trial, when a bound itself is not a valid value of the key.
        trial_config(cfg, {key: int(low) if _is_int_field(annotation) else low})
        trial_config(cfg, {key: int(high) if _is_int_field(annotation) else high})
    return space


def check_objective(cfg: RunConfig) -> None:
    """Refuse a validation objective without a set, or one that is the evaluation test set."""
    if cfg.tune.objective != "validation":
        return
    data = cfg.tune.validation_data
    if not data:
        raise ConfigError("tune.objective 'validation' needs tune.validation_data (a labelled set)")
    if data == cfg.eval.data or _resolved(data) == _resolved(cfg.eval.data):
        raise ConfigError(
            f"tune.validation_data '{data}' is the evaluation test set (eval.data): selecting on it would "
            "bias the reported test accuracy; give a separate labelled set or use objective 'agreement'"
        )


def _resolved(source: str) -> str:
    if source.startswith("torchvision:"):
        return source.lower()
    try:
        from intraq_core.assets import resolve_asset

        return str(Path(resolve_asset(source)).resolve())
    except Exception:  # unresolvable here: compare as given
        return source


def extreme(cfg: RunConfig, key: str, value: float, pick: Any) -> float:
    """``pick`` (min or max) of ``key``'s values in ``tune.space``, or ``value`` when it is not searched."""
    space = cfg.tune.space
    return float(pick(space[key])) if key in space else float(value)


def check_trial_batches(cfg: RunConfig) -> None:
    """Every trial's ``distill.batch_size`` fits in its training images, at the extremes of
    ``tune.space`` (the largest batch and hold-out fraction with the fewest images): refused in one
    line before Ray starts, as ``run`` refuses it (:func:`pipeline.stages.train.check_batch`)."""
    d = cfg.distill
    batch = int(extreme(cfg, "distill.batch_size", d.batch_size, max))
    holdout = extreme(cfg, "distill.holdout_fraction", d.holdout_fraction, max)
    images = int(extreme(cfg, "generate.num_images", cfg.generate.num_images, min))
    worst = cfg.model_copy(update={"distill": d.model_copy(update={"batch_size": batch, "holdout_fraction": holdout})})
    keys = ("distill.batch_size", "distill.holdout_fraction", "generate.num_images")
    searched = ", ".join(k for k in keys if k in cfg.tune.space)
    source = "generate.num_images" + (f", with {searched} at their extremes in tune.space" if searched else "")
    check_batch(worst, images, source=source)


def check_tune(cfg: RunConfig) -> None:
    """Every check of a search that needs no Ray, once: the objective (:func:`check_objective`) and
    every trial's batch (:func:`check_trial_batches`). The CLI runs it before the log file and Ray;
    :func:`tune_search` assumes it ran."""
    check_objective(cfg)
    check_trial_batches(cfg)
