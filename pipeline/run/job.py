"""The whole job: generate → quantize + distil → evaluate → ``metrics.json``.

The run location (``storage.url``) holds everything of one run::

    run.yaml                 the resolved config
    LOCK                     lease held while the run is active (see :func:`pipeline.storage.lock.run_lock`)
    data/manifest.json       synthetic dataset (data/shards/*.parquet)
    student_calibrated.pt    quantized student after range calibration (before distillation)
    train_state.pt           local executor: last finished epoch (resume point), weights-only
    ray_train/               Ray executor: Ray Train's epoch checkpoints (resume point)
    student.pt               final student (weights-only loadable)
    train_history.json       per-epoch distillation statistics
    metrics.json             the numbers (written last)

One way through a command: :func:`open_run` checks everything that needs no lock (bad input
fails here, before Ray starts and before the location is touched), resolves the dataset and
chooses the executor once (:mod:`pipeline.run.executor`); :meth:`Run.execute` then takes the run
lock and runs the stages, each handed the same :class:`~pipeline.context.RunContext`, and
:func:`run_metrics` builds ``metrics.json`` for every command that trains. The stages assume
Ray is up when the executor is ``ray`` (the CLI enters the Ray session between the two).

Failure and recovery (README "Failure and recovery"):

* Bad input is found by :func:`open_run` (:mod:`pipeline.run.checks`) before Ray starts and
  before the location is touched: nothing is created, deleted or overwritten by a refused command.
* The run lock is a short lease refreshed by a heartbeat while the run lives; a crashed run's
  lock is taken over at once on the same host (its pid is gone), elsewhere when the lease ends.
* Every shard is validated before training, and bad shards are regenerated with ``--repair``
  (:mod:`pipeline.run.dataset`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.config import RUN_CONFIG_PATH, RunConfig
from pipeline.context import RunContext
from pipeline.errors import InputError, RunExistsError, StorageError
from pipeline.report.methods import generation_budget, run_method
from pipeline.run.checks import check_device, check_flags, check_inputs, check_location, check_probe
from pipeline.run.dataset import build_dataset, source_config, validate_or_repair
from pipeline.run.executor import Executor, executor_for
from pipeline.stages.evaluate import evaluate_run
from pipeline.stages.generate import GenerationStats
from pipeline.stages.train import (
    CALIBRATED_PATH,
    STUDENT_PATH,
    TRAIN_HISTORY_PATH,
    TrainOutcome,
    check_batch,
    quantize_only,
)
from pipeline.stages.train_state import TRAIN_STATE_PATH
from pipeline.storage.lock import Lock, run_lock
from pipeline.storage.manifest import Manifest
from pipeline.storage.shards import ShardError
from pipeline.storage.store import Storage

log = logging.getLogger(__name__)

METRICS_PATH = "metrics.json"


def prepare_location(ctx: RunContext, *, resume: bool, overwrite: bool) -> None:
    """Under the lock: check the location is still free (or being resumed), then record the config."""
    storage = ctx.storage
    check_location(ctx, resume=resume, overwrite=overwrite, probe=False)
    has_run = storage.exists(RUN_CONFIG_PATH)
    if has_run and overwrite:
        for rel in storage.ls(""):
            name = rel.rstrip("/").rsplit("/", 1)[-1]
            if name != "LOCK":
                storage.delete(name, recursive=True)
    text = ctx.cfg.to_yaml().encode()
    if has_run and resume and storage.read_bytes(RUN_CONFIG_PATH) == text:
        return  # same run, same settings: leave the file alone
    storage.write_bytes_atomic(RUN_CONFIG_PATH, text)


# -- a run: opened once, then executed ----------------------------------------------------------

Command = Literal["run", "generate", "train"]

#: What the training stage writes (replaced by ``train --overwrite``, the dataset is kept).
TRAIN_OUTPUTS = (CALIBRATED_PATH, STUDENT_PATH, TRAIN_HISTORY_PATH, METRICS_PATH, "ray_train", TRAIN_STATE_PATH)


@dataclass
class Run:
    """One command on one run location, checked and ready: see :func:`open_run`."""

    ctx: RunContext
    command: Command
    executor: Executor
    resume: bool = False
    overwrite: bool = False
    repair: bool = False
    #: ``train`` only: the dataset's manifest, and the config that generated it.
    manifest: Manifest | None = None
    source_cfg: RunConfig | None = None
    lock: Lock | None = field(default=None, repr=False)

    @property
    def continues(self) -> bool:
        """Whether the command continues what is at the location (--resume or --repair)."""
        return self.resume or self.repair

    def execute(self, *, progress: bool = True) -> Any:
        """Take the run lock and run the command's stages: metrics (``run``, ``train``) or the manifest."""
        with run_lock(self.ctx.storage) as lock:
            self.lock = lock
            try:
                if self.command == "generate":
                    prepare_location(self.ctx, resume=self.continues, overwrite=self.overwrite)
                    manifest, _, _ = build_dataset(
                        self.ctx, repair=self.repair, progress=progress, executor=self.executor
                    )
                    return manifest
                if self.command == "run":
                    return _run_stages(self, progress=progress)
                return _train_stages(self, progress=progress)
            finally:
                self.lock = None


def open_run(
    cfg: RunConfig,
    command: Command = "run",
    *,
    resume: bool = False,
    overwrite: bool = False,
    repair: bool = False,
    dataset: str | None = None,
    cluster: str | None = None,
) -> Run:
    """Every check of ``command`` that needs no lock, once; touches nothing.

    Checks the device (``cluster``: the ``--cluster`` file the run goes to) and that the
    location's storage answers (failing fast), loads the teacher (hashed once, cached in the
    context), checks the inputs and the batch against the training images, probes the location
    once, resolves ``train``'s dataset and chooses the executor. The CLI calls it before starting
    Ray, so bad input fails in a second, not after a cluster start.
    """
    check_flags(resume, overwrite, repair)
    if dataset is not None:
        cfg = cfg.model_copy(update={"dataset": dataset})
    ctx = RunContext.create(cfg)
    cfg = ctx.cfg  # the synthesis plan resolved for the teacher's classes (generate.min_images_per_class)
    check_device(cfg, cluster)
    ctx.storage.fail_fast().check_reachable()
    run = Run(ctx, command, executor_for(cfg), resume=resume, overwrite=overwrite, repair=repair)
    check_probe(ctx)
    if command == "train":
        _open_training(run)
        return run
    if command == "run" and cfg.needs_synthetic_data():
        check_batch(cfg, cfg.generate.num_images, source="generate.num_images")
    needs_plan = command == "generate" or (cfg.dataset is None and cfg.needs_synthetic_data())
    check_inputs(ctx, generate=needs_plan, evaluate=command != "generate")
    check_location(ctx, resume=run.continues, overwrite=overwrite)
    return run


def _open_training(run: Run) -> None:
    """``train``'s checks: its dataset (another location's, or its own) exists, is complete and
    comes from this teacher; the location is writable."""
    import yaml

    from pipeline.storage.shards import read_shard

    ctx, cfg = run.ctx, run.ctx.cfg
    if cfg.dataset is not None:
        other = Storage.from_config(cfg.storage.model_copy(update={"url": cfg.dataset}))
        if other.url.rstrip("/") == ctx.storage.url.rstrip("/"):
            ctx = RunContext.create(cfg.model_copy(update={"dataset": None}))
            run.ctx = ctx
    own = ctx.cfg.dataset is None
    if run.repair and not own:
        raise InputError(
            f"--repair regenerates this run's own dataset, but the dataset at {ctx.dataset_storage.url} "
            f"belongs to another run location: repair it there (intraq-pipeline generate --repair -o {cfg.dataset})"
        )
    check_inputs(ctx, generate=False, evaluate=True)
    data = ctx.dataset_storage
    if not Manifest.exists(data):
        raise FileNotFoundError(
            f"no synthetic dataset at {data.url} (manifest.json missing): run `intraq-pipeline generate` "
            "first or pass --dataset"
        )
    manifest = Manifest.load(data)
    if not manifest.is_complete():
        raise StorageError(
            f"{data.url} holds {len(manifest.shards)}/{manifest.num_shards_planned} shards: finish it "
            "with `intraq-pipeline generate --resume`"
        )
    if manifest.rows:  # (a dataset without images is refused by the training stage, naming it)
        check_batch(cfg, manifest.rows, source=f"the dataset at {data.url}")
    if manifest.shards:
        try:
            meta = read_shard(data, manifest.shards[0].path).meta
        except (ShardError, FileNotFoundError):
            meta = {}  # reported, with every other problem, by the validation under the lock
        if meta.get("teacher_sha256") not in (None, ctx.teacher_sha256):
            raise StorageError(f"{data.url} was synthesized from another teacher than model.weights")
    source_cfg = ctx.cfg
    dataset_root = data.url.rstrip("/").rsplit("/", 1)[0]
    with_yaml = Storage.from_config(cfg.storage.model_copy(update={"url": dataset_root}))
    if with_yaml.exists(RUN_CONFIG_PATH):
        source_cfg = source_config(yaml.safe_load(with_yaml.read_bytes(RUN_CONFIG_PATH)), ctx.cfg, with_yaml)
    ctx.storage.fail_fast().check_writable()
    run.manifest, run.source_cfg = manifest, source_cfg


def run_pipeline(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    repair: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage and return the metrics (also written to ``metrics.json``).

    ``repair`` continues the run (like ``resume``) and regenerates only shards that fail
    validation. Bad input is refused before the location is touched.
    """
    return open_run(cfg, "run", resume=resume, overwrite=overwrite, repair=repair).execute(progress=progress)


def generate_stage(
    cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, repair: bool = False, progress: bool = True
) -> Manifest:
    """Generate the synthetic dataset only (``intraq-pipeline generate``), holding the run lock.

    The dataset is validated at the end (bad shards: an error naming them); with ``repair`` only
    the bad shards are regenerated.
    """
    return open_run(cfg, "generate", resume=resume, overwrite=overwrite, repair=repair).execute(progress=progress)


def train_stage(
    cfg: RunConfig,
    *,
    dataset: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    repair: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize, calibrate and distil on an existing synthetic dataset, then evaluate.

    The dataset is ``dataset`` (a run location), else ``cfg.dataset``, else the run location's
    own ``data/`` (from ``intraq-pipeline generate``). Training on the location's own dataset
    keeps it: ``--overwrite`` then replaces only the training outputs. The dataset's generation
    settings need not be repeated in ``cfg``; its model must be the same teacher. ``--resume``
    continues an interrupted training from its last epoch checkpoint (either executor). Every
    shard is validated first; ``repair`` regenerates bad shards of the location's own dataset.
    """
    run = open_run(cfg, "train", resume=resume, overwrite=overwrite, repair=repair, dataset=dataset)
    return run.execute(progress=progress)


def _train_stages(run: Run, *, progress: bool) -> dict[str, Any]:
    """``train``: validate (and repair) the dataset, train, evaluate, write metrics.json."""
    ctx, storage, lock = run.ctx, run.ctx.storage, run.lock
    assert run.manifest is not None and run.source_cfg is not None and lock is not None
    manifest, data = run.manifest, ctx.dataset_storage
    own = ctx.cfg.dataset is None
    if own:
        trained = [p for p in TRAIN_OUTPUTS if storage.exists(p)]
        if trained and not (run.resume or run.overwrite or run.repair):
            raise RunExistsError(
                f"{storage.url} already holds a trained student; pass --resume to continue it or "
                "--overwrite to retrain (the dataset is kept)"
            )
    else:
        check_location(ctx, resume=run.continues, overwrite=run.overwrite, probe=False)
    # Validate (and repair) before anything at the location is written.
    manifest, gen_stats, repaired = validate_or_repair(
        ctx,
        data,
        manifest,
        repair=run.repair,
        progress=progress,
        executor=run.executor,
        sources=[run.source_cfg, ctx.cfg],
    )
    if own:
        if run.overwrite:
            for rel in trained:
                storage.delete(rel, recursive=True)
        storage.write_bytes_atomic(RUN_CONFIG_PATH, ctx.cfg.to_yaml().encode())
    else:
        prepare_location(ctx, resume=run.continues, overwrite=run.overwrite)
    return _train_and_evaluate(run, manifest, {}, gen_stats, repaired, progress=progress)


def _run_stages(run: Run, *, progress: bool) -> dict[str, Any]:
    """``run``: generate (or resume, repair) the dataset, train, evaluate, write metrics.json."""
    ctx = run.ctx
    prepare_location(ctx, resume=run.continues, overwrite=run.overwrite)
    t0 = time.perf_counter()
    manifest: Manifest | None = None
    gen_stats, repaired = GenerationStats(), []
    if ctx.cfg.needs_synthetic_data():  # not SQuant without distillation
        manifest, gen_stats, repaired = build_dataset(ctx, repair=run.repair, progress=progress, executor=run.executor)
    seconds = {"generate": time.perf_counter() - t0}
    run.source_cfg = ctx.cfg
    return _train_and_evaluate(run, manifest, seconds, gen_stats, repaired, progress=progress)


def _train_and_evaluate(
    run: Run,
    manifest: Manifest | None,
    seconds: dict[str, float],
    gen_stats: GenerationStats | None,
    repaired: list[int],
    *,
    progress: bool,
) -> dict[str, Any]:
    assert run.lock is not None
    run.lock.check()
    t0 = time.perf_counter()
    # No dataset: the data-free student only (SQuant without distillation).
    outcome = quantize_only(run.ctx) if manifest is None else run.executor.train(run.ctx, manifest, progress=progress)
    seconds.update(
        {
            "calibrate": outcome.seconds_calibrate,
            "distill": outcome.seconds_distill,
            "train_total": time.perf_counter() - t0,
        }
    )
    run.lock.check()
    t0 = time.perf_counter()
    evaluation = evaluate_run(run.ctx, progress=progress)
    seconds["evaluate"] = time.perf_counter() - t0
    metrics = run_metrics(run, manifest, outcome, evaluation, seconds, gen_stats, repaired)
    run.lock.check()
    run.ctx.storage.write_json_atomic(METRICS_PATH, metrics)
    return metrics


def run_metrics(
    run: Run,
    manifest: Manifest | None,
    outcome: TrainOutcome,
    evaluation: dict[str, Any],
    seconds: dict[str, float],
    gen_stats: GenerationStats | None,
    repaired: list[int],
) -> dict[str, Any]:
    """``metrics.json``: the test-set numbers, the recipe, the data-parallel shape and the timings.

    ``train_workers``, ``global_batch_size`` and ``optimizer_steps`` are top-level: the same
    recipe gives the same ``global_batch_size`` and ``optimizer_steps`` for any ``train_workers``.
    """
    ctx = run.ctx
    source = run.source_cfg or ctx.cfg
    # The dataset's generation settings with this run's quantization and distillation.
    method_cfg = source.model_copy(update={"quant": ctx.cfg.quant, "distill": ctx.cfg.distill})
    budget = generation_budget(source)
    metrics = {
        **evaluation,
        "method": run_method(method_cfg),
        "w_bits": ctx.cfg.quant.w_bits,
        "a_bits": ctx.cfg.quant.a_bits,
        **budget,
        "num_images": manifest.rows if manifest is not None else 0,
        "epochs": ctx.cfg.distill.epochs,
        "seed": ctx.cfg.seed,
        "executor": run.executor.name,
        "device": outcome.device,
        "train_workers": outcome.train_workers,
        "global_batch_size": outcome.global_batch_size,
        "optimizer_steps": outcome.optimizer_steps,
        "config_hash": ctx.cfg.config_hash(),
        "dataset_hash": manifest.config_hash if manifest is not None else None,
        "dataset": ctx.dataset_storage.url if manifest is not None else None,
        "training": outcome.summary(),
        "seconds": seconds,
        "dataset_shards": len(manifest.shards) if manifest is not None else 0,
    }
    if gen_stats is not None and run.command == "run":
        metrics["generation"] = gen_stats.summary()
    if repaired:
        metrics["repaired_shards"] = repaired
    return metrics
