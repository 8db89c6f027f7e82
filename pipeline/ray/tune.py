"""Ray Tune search of the generation and distillation knobs (``intraq-pipeline tune``).

Each trial is :func:`pipeline.ray.tune_trial.run_trial` (the local executor's generate + train, scored
on a fixed probe set), the space and the checks before Ray are :mod:`pipeline.ray.tune_space`'s.
``tune.search: optuna`` uses ``OptunaSearch`` with a seeded TPE sampler whose random start-up phase is
a quarter of ``tune.num_samples`` (Optuna's default of 10 would leave a search of 8 trials random);
``random`` is Tune's seeded random search. ASHA stops weak trials at any report.

The best trial is the one with the highest final objective among trials that ran every epoch
(ASHA-stopped trials only count when none finished). Its settings applied to the base config give
the best config, written as YAML (``<run>/tune/best.yaml``) that ``intraq-pipeline run --config``
accepts; ``<run>/tune/results.json`` holds the table of all trials.

Progress: a driver-side tqdm bar of finished trials with the best objective so far and the
errors (:class:`_TrialBar`, a Tune ``Callback``). It is not a ``tqdm_ray`` bar in the trials
because what it shows exists only on the driver: how many of ``tune.num_samples`` trials ended
(completed, stopped by ASHA or failed — a trial stopped by ASHA is ended by the Tune controller,
never by code of its own) and the best objective over all of them; a trial knows only its own
reports. Nothing crosses a process either: Tune calls the callback in the driver's process.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.ray.tune_space import extreme, search_space, trial_config
from pipeline.ray.tune_trial import OBJECTIVE, TUNE_DIR, probe_images, run_trial
from pipeline.storage.store import Storage

__all__ = [
    "BEST_PATH",
    "RESULTS_PATH",
    "search_algorithm",
    "trial_resources",
    "tune_search",
    "write_best_config",
]

RESULTS_PATH = f"{TUNE_DIR}/results.json"
BEST_PATH = f"{TUNE_DIR}/best.yaml"


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
    images = extreme(cfg, "generate.num_images", g.num_images, max)
    batch = extreme(cfg, "generate.batch_size", g.batch_size, min)
    per_round = extreme(cfg, "generate.shards_per_round", g.shards_per_round, min)
    epochs = extreme(cfg, "distill.epochs", cfg.distill.epochs, max)
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
        probe = probe_images(cfg, storage, progress)
    epochs = cfg.distill.epochs
    from pipeline.ray.train import worker_config

    base = worker_config(cfg, storage)  # absolute paths: Tune moves trials to their own directory
    trainable = tune.with_parameters(run_trial, base=base, tune_url=storage.join(TUNE_DIR), probe=probe)
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
