"""Ray Tune search of the generation and distillation knobs (``intraq-pipeline tune``).

What a trial is. One trial = the local executor's run on a small dataset with the trial's
settings: :func:`pipeline.stages.generate.generate_local` into ``<run>/tune/trial-<id>/``, then
:func:`pipeline.stages.train.train_local` (the one training loop) on it. It reports the objective
after every generation round (the agreement of a student calibrated on the images so far:
the post-training-quantization quality of the data, cheap to measure) and after every
distillation epoch, so the ASHA scheduler (``tune.grace_reports`` reports of grace) can stop a
weak trial during generation, before its most expensive phase.

Why a plain function trainable and not Tune + Train. A trial runs in its Tune actor, reserved
with ``tune.with_resources(fn, {"cpu": 1, "gpu": tune.gpus_per_trial})`` (fractional GPUs: small
CIFAR trials share a GPU) and at most ``tune.max_concurrent`` at a time. Nesting a
``TorchTrainer`` per trial would add ~20 s of fixed cost per trial, needs the dashboard's State
API for ASHA to release stopped trials, and deadlocks when trial CPUs + Train worker CPUs exceed
the cluster (docs/ray-on-a-small-box.md); the trials' datasets and models are small, so one
process per trial is both faster and safe on 2 CPUs. Parallelism comes from concurrent trials.

The objective (metric ``objective``, maximized):

* ``agreement`` (default, data-free): top-1 teacher–student agreement (%) on ONE fixed probe
  set of synthetic images, generated once before the search (``<run>/tune/probe-<hash>/``)
  with a fixed recipe that owes nothing to the base config's loss weights or to the searched
  space: the ``bns_ce`` preset (BN statistics + cross-entropy, the ZeroQ/GDFQ-style baseline) at
  the base config's image count and iterations, with a derived seed. Each trial's own held-out
  split is still reported (``holdout_agreement``) but not optimized: it is made of that trial's
  images, so settings that produce easy images would score well on it.
* ``validation``: top-1 (%) on ``tune.validation_data``, a labelled set the user supplies. It is
  refused when it is the evaluation test set (``eval.data``): selecting on the test set would
  make the reported test accuracy optimistic.

The space (``tune.space``): dotted config keys → ``[low, high]``. Loss weights (``*_weight``,
``kd_alpha``) and learning rates (``lr``) are sampled log-uniformly (when ``low > 0``); margins,
ε, areas, temperatures uniformly; integer fields as integers. ``tune.search: optuna`` uses
``OptunaSearch`` with a seeded TPE sampler whose random start-up phase is a quarter of
``tune.num_samples`` (Optuna's default of 10 would leave a search of 8 trials random);
``random`` is Tune's seeded random search.

A trial whose distillation diverges reports objective 0 (status ``diverged``) rather than
crashing, so the searcher learns to avoid that region. The best trial is the one with the
highest final objective among trials that ran every epoch (ASHA-stopped trials only count
when none finished). Its settings applied to the base config give the best config, written as
YAML (``<run>/tune/best.yaml``) that ``intraq-pipeline run --config`` accepts;
``<run>/tune/results.json`` holds the table of all trials.
"""

from __future__ import annotations

import contextlib
import math
import os
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, deep_merge, nest_dotted, parse_overrides, validate_run_config
from pipeline.stages.train import check_batch
from pipeline.storage.store import Storage

__all__ = [
    "BEST_PATH",
    "OBJECTIVE",
    "RESULTS_PATH",
    "TUNE_DIR",
    "check_objective",
    "check_trial_batches",
    "check_tune",
    "probe_config",
    "search_algorithm",
    "search_space",
    "trial_config",
    "trial_resources",
    "tune_search",
    "write_best_config",
]

TUNE_DIR = "tune"
PROBE_DIR = "probe"
RESULTS_PATH = f"{TUNE_DIR}/results.json"
BEST_PATH = f"{TUNE_DIR}/best.yaml"
#: The metric every trial reports and the search maximizes.
OBJECTIVE = "objective"
# Seed purpose of the probe set (different images from any trial's, whatever its settings).
PURPOSE_PROBE = 201
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


def _subconfig(cfg: RunConfig, url: str, **updates: Any) -> RunConfig:
    data = cfg.to_dict()
    data.update({"executor": "local", "dataset": None, **updates})
    data["storage"] = {**data["storage"], "url": url}
    return validate_run_config(data)


def _trial_objective(cfg: RunConfig, ctx: Any, teacher: Any, probe: Any) -> Any:
    """``objective(student) -> float`` of a trial: probe agreement, or top-1 on the validation set."""
    import torch

    from intraq_core.data import load_test_set
    from intraq_core.evaluate import agreement, top1

    device = ctx.device
    if cfg.tune.objective == "validation":
        assert cfg.tune.validation_data is not None
        eval_cfg = cfg.eval.model_copy(update={"data": cfg.tune.validation_data})
        test_set = load_test_set(eval_cfg, ctx.model_cfg)
        return lambda student: float(top1(student, test_set.batches(eval_cfg.batch_size), device=device)["top1"])
    probe_x = torch.tensor(probe)  # a copy: the shared array is read-only
    return lambda student: float(agreement(student, teacher, probe_x, device=device)["agreement"])


def _run_trial(params: dict[str, Any], *, base: dict[str, Any], tune_url: str, probe: Any) -> None:
    """One trial (in a Tune actor): the local executor's generate + train, reporting as it goes."""
    from ray import tune

    from intraq_core.distill import DivergenceError
    from pipeline.context import RunContext, limit_threads
    from pipeline.stages.calibration import prepare_student
    from pipeline.stages.generate import generate_local
    from pipeline.stages.holdout import split_mask
    from pipeline.stages.train import load_dataset, train_local

    limit_threads()
    trial_id = tune.get_context().get_trial_id()
    base_cfg = RunConfig.model_validate(base)
    cfg = _subconfig(trial_config(base_cfg, params), f"{tune_url}/trial-{trial_id}")
    ctx = RunContext.create(cfg)
    ctx.storage.write_bytes_atomic("trial.yaml", cfg.to_yaml().encode())
    teacher = ctx.teacher().to(ctx.device)
    objective = _trial_objective(cfg, ctx, teacher, probe)

    def after_round(manifest: Any) -> None:
        images, _, indices = load_dataset(ctx, manifest)
        hold = split_mask(indices, cfg.seed, cfg.distill.holdout_fraction)
        student = prepare_student(ctx, teacher, images[~hold])
        tune.report({OBJECTIVE: objective(student), "phase": "generate", "shards": len(manifest.shards), "epoch": 0})

    def after_epoch(epoch: int, distiller: Any, rows: list[dict[str, Any]]) -> None:
        row = rows[-1]
        report: dict[str, Any] = {
            OBJECTIVE: objective(distiller.module),
            "phase": "distill",
            "epoch": epoch + 1,
            "loss": float(row["loss"]),
            "train_agreement": 100.0 * float(row["agreement"]),
        }
        if "holdout_agreement" in row:
            report["holdout_agreement"] = float(row["holdout_agreement"])
        tune.report(report)
        done[0] = epoch + 1

    done = [0]
    manifest, _ = generate_local(ctx, progress=False, on_round=after_round)
    try:
        train_local(ctx, manifest, progress=False, on_epoch=after_epoch)
    except DivergenceError:
        # A diverged recipe is a result, not a crash: score it 0 so the searcher learns to avoid it.
        tune.report({OBJECTIVE: 0.0, "phase": "distill", "epoch": done[0] + 1, "diverged": 1.0})


def probe_config(cfg: RunConfig, storage: Storage) -> RunConfig:
    """The probe set's generation config: a fixed ``bns_ce`` recipe, whatever the base weights.

    Only the budget (images, batch, iterations, rounds), the engineering knobs (memory format,
    compile, amp, micro-batches, pixel storage), the model and a seed derived from the run's seed
    are taken from ``cfg``; loss weights, margins and LOR are the preset's.
    """
    from intraq_core.config import SynthConfig
    from intraq_core.seeding import derive_seed

    g = cfg.generate
    recipe = SynthConfig(
        method="bns_ce",
        num_images=g.num_images,
        batch_size=g.batch_size,
        iterations=g.iterations,
        shards_per_round=g.shards_per_round,
        channels_last=g.channels_last,
        compile=g.compile,
        amp=g.amp,
        micro_batch_size=g.micro_batch_size,
        groups_per_pass=g.groups_per_pass,
        store_dtype=g.store_dtype,
    )
    seed = derive_seed(cfg.seed, PURPOSE_PROBE) % 2**31
    probe_cfg = _subconfig(cfg, storage.url, seed=seed, generate=recipe.model_dump(mode="json"))
    where = storage.join(TUNE_DIR, f"{PROBE_DIR}-{probe_cfg.dataset_hash()[:12]}")
    return _subconfig(probe_cfg, where)


def _probe_images(cfg: RunConfig, storage: Storage, progress: bool) -> Any:
    """The fixed probe set (:func:`probe_config`), generated once."""
    from pipeline.context import RunContext
    from pipeline.stages.generate import generate_local
    from pipeline.storage.manifest import read_all

    ctx = RunContext.create(probe_config(cfg, storage))
    manifest, _ = generate_local(ctx, progress=progress)
    images, _ = read_all(ctx.storage.child("data"), manifest)
    return images


def search_algorithm(cfg: RunConfig) -> Any:
    """The seeded searcher of ``tune.search``; Optuna's TPE leaves its random phase within the search."""
    if cfg.tune.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        startup = min(10, max(1, cfg.tune.num_samples // 4))
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup)
        return OptunaSearch(sampler=sampler)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.seed)


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """What one trial reserves: a CPU, and ``tune.gpus_per_trial`` GPUs when the cluster has GPUs."""
    from pipeline.ray.train import resolve_use_gpu

    resources: dict[str, float] = {"cpu": 1}
    if resolve_use_gpu(cfg):
        resources["gpu"] = cfg.tune.gpus_per_trial
    return resources


def _extreme(cfg: RunConfig, key: str, value: float, pick: Any) -> float:
    """``pick`` (min or max) of ``key``'s values in ``tune.space``, or ``value`` when it is not searched."""
    space = cfg.tune.space
    return float(pick(space[key])) if key in space else float(value)


def check_trial_batches(cfg: RunConfig) -> None:
    """Every trial's ``distill.batch_size`` fits in its training images, at the extremes of
    ``tune.space`` (the largest batch and hold-out fraction with the fewest images): refused in one
    line before Ray starts, as ``run`` refuses it (:func:`pipeline.stages.train.check_batch`)."""
    d = cfg.distill
    batch = int(_extreme(cfg, "distill.batch_size", d.batch_size, max))
    holdout = _extreme(cfg, "distill.holdout_fraction", d.holdout_fraction, max)
    images = int(_extreme(cfg, "generate.num_images", cfg.generate.num_images, min))
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


#: Credentials Ray Tune copies from the driver's environment into every trial's runtime env, which
#: Ray's runtime-env agent then writes in clear to its log file (``runtime_env_agent.log``).
_CREDENTIAL_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})


@contextlib.contextmanager
def _credentials_not_propagated() -> Iterator[None]:
    """Tune's trials without the driver's cloud credentials in their runtime env.

    A trial finds its credentials where every worker of this pipeline does, in its node's own
    environment (credentials are never shipped: pipeline.ray.session.WORKER_ENV_VARS), so nothing is lost;
    but a runtime env is logged verbatim by Ray, so propagating them put the secret in Ray's logs.
    """
    from ray.tune.execution import class_cache

    propagated = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = set(propagated) - _CREDENTIAL_VARS
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = propagated


def _planned_reports(cfg: RunConfig) -> int:
    """The most reports a trial can make (ASHA's ``max_t``): one per generation round, one per
    epoch, at the extremes of ``tune.space`` for the keys that change those counts."""
    g = cfg.generate
    images = _extreme(cfg, "generate.num_images", g.num_images, max)
    batch = _extreme(cfg, "generate.batch_size", g.batch_size, min)
    per_round = _extreme(cfg, "generate.shards_per_round", g.shards_per_round, min)
    epochs = _extreme(cfg, "distill.epochs", cfg.distill.epochs, max)
    shards = math.ceil(images / min(batch, images))
    return int(math.ceil(shards / per_round) + epochs)


class _TrialBar:
    """A tqdm bar of finished trials (a Tune callback on the driver), with the best objective."""

    def __init__(self, total: int, enabled: bool) -> None:
        from ray.tune import Callback

        outer = self

        class _Callback(Callback):
            def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
                outer.result(result)

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                outer.done()

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                outer.done(error=True)

        self.callback = _Callback()
        self.best = -math.inf
        self.errors = 0
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="tune", unit="trial")

    def result(self, result: dict[str, Any]) -> None:
        value = result.get(OBJECTIVE)
        if isinstance(value, (int, float)) and value > self.best:
            self.best = float(value)
            self._postfix()

    def done(self, error: bool = False) -> None:
        self.errors += int(error)
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            best = f"{self.best:.2f}" if self.best > -math.inf else "-"
            self.bar.set_postfix(best=best, errors=self.errors)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _results_table(grid: Any, keys: list[str], max_epochs: int) -> list[dict[str, Any]]:
    """One row per trial: its parameters, final and best objective, epochs run and status."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        epochs = int(metrics.get("epoch", 0) or 0)
        history = result.metrics_dataframe
        best = None
        generation_reports = 0
        if history is not None and OBJECTIVE in getattr(history, "columns", ()):
            best = float(history[OBJECTIVE].max())
            if "phase" in history.columns:
                generation_reports = int((history["phase"] == "generate").sum())
        if result.error is not None:
            status = "error"
        elif metrics.get("diverged"):
            status = "diverged"
        elif epochs >= max_epochs:
            status = "completed"
        else:
            status = "stopped"
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or Path(str(result.path)).name,
                **{k: config.get(k) for k in keys},
                OBJECTIVE: metrics.get(OBJECTIVE),
                "best_objective": best,
                "holdout_agreement": metrics.get("holdout_agreement"),
                "epochs": epochs,
                "generation_reports": generation_reports,
                "status": status,
                "error": None if result.error is None else str(result.error).strip().splitlines()[0][:300],
            }
        )

    def order(row: dict[str, Any]) -> tuple[int, float]:
        value = row[OBJECTIVE]
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        rank = {"completed": 0, "stopped": 1, "diverged": 2, "error": 3}[row["status"]]
        return (rank, -(value if finite else -math.inf))

    return sorted(rows, key=order)


def tune_search(cfg: RunConfig, *, progress: bool = True) -> tuple[RunConfig, list[dict[str, Any]]]:
    """Search ``cfg.tune.space`` with ASHA (+ Optuna); return the best config and the trials table.

    Writes ``<run>/tune/{probe/,trial-<id>/,ray/,results.json,best.yaml}`` in the run storage.
    Uses the Ray this process is connected to (``pipeline.ray.session.start_ray``). ``cfg`` has
    passed :func:`check_tune` (before Ray started).
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = search_space(cfg)
    storage = Storage.from_config(cfg.storage)
    if storage.kind == "memory":
        raise ValueError("memory:// storage lives in one process; tune needs a local path, file:// or s3://")
    storage.check_writable()
    if not ray.is_initialized():
        raise RuntimeError("tune_search needs a running Ray (pipeline.ray.session.start_ray)")

    probe = None
    if cfg.tune.objective == "agreement":
        probe = _probe_images(cfg, storage, progress)
    epochs = cfg.distill.epochs
    from pipeline.ray.train import worker_config

    base = worker_config(cfg, storage)  # absolute paths: Tune moves trials to their own directory
    trainable = tune.with_parameters(_run_trial, base=base, tune_url=storage.join(TUNE_DIR), probe=probe)
    max_reports = _planned_reports(cfg)
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_reports,
        grace_period=min(cfg.tune.grace_reports, max_reports),
        reduction_factor=2,
    )
    search_alg = search_algorithm(cfg)
    fs, _ = storage.pyarrow_filesystem()
    bar = _TrialBar(cfg.tune.num_samples, progress)
    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_resources(cfg)),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=cfg.tune.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{cfg.config_hash()[:12]}",
            storage_path=storage.pyarrow_path(f"{TUNE_DIR}/ray"),
            storage_filesystem=fs,
            verbose=0,
            callbacks=[bar.callback],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    try:
        with _credentials_not_propagated():
            grid = tuner.fit()
    finally:
        bar.close()

    keys = list(space)
    table = _results_table(grid, keys, epochs)
    usable = [r for r in table if r["status"] == "completed"] or [r for r in table if r["status"] == "stopped"]
    usable = [r for r in usable if isinstance(r[OBJECTIVE], (int, float)) and math.isfinite(r[OBJECTIVE])]
    if not usable:
        if table and all(r["status"] == "diverged" for r in table):
            raise RuntimeError("every tune trial diverged: narrow tune.space (lower kd_alpha, lr)")
        first = next((r["error"] for r in table if r["error"]), "no trial reported an objective")
        raise RuntimeError(f"every tune trial failed: {first}")
    best_row = max(usable, key=lambda r: r[OBJECTIVE])
    best = trial_config(cfg, {k: best_row[k] for k in keys if best_row.get(k) is not None})
    storage.write_json_atomic(RESULTS_PATH, {"objective": cfg.tune.objective, "trials": table})
    storage.write_bytes_atomic(BEST_PATH, best.to_yaml().encode())
    return best, table


def write_best_config(best: RunConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``best`` as YAML that ``intraq-pipeline run --config`` accepts."""
    out = Path(path).expanduser()
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(best.to_yaml())
    return out
