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

* Bad input is found by :func:`open_run` before Ray starts and before the location is touched:
  nothing is created, deleted or overwritten by a refused command.
* The run lock is a short lease refreshed by a heartbeat while the run lives; a crashed run's
  lock is taken over at once on the same host (its pid is gone), elsewhere when the lease ends.
* Every shard is validated (:func:`pipeline.storage.shards.validate_dataset`) before training, and
  before a resumed generation uses finished shards for later rounds' MDC centres. A bad shard
  is an error naming it; ``repair=True`` (``--repair``) drops only the bad shards from the
  manifest and regenerates them. Generation is deterministic per shard (fixed labels and seeds,
  MDC centres from the features of earlier rounds, which are validated), so a repaired shard is
  byte-identical to the original and later rounds, generated from the original, stay valid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from intraq_core.errors import ModelError, first_line
from intraq_core.quant import quant_map
from intraq_core.student import load_student
from pipeline.config import RunConfig
from pipeline.context import RunContext, dataset_storage
from pipeline.errors import InputError, StorageError
from pipeline.report.methods import generation_budget, run_method
from pipeline.run.executor import Executor, executor_for
from pipeline.stages.evaluate import evaluate_model
from pipeline.stages.generate import GenerationStats, store_dtype
from pipeline.stages.train import (
    CALIBRATED_PATH,
    STUDENT_PATH,
    TRAIN_HISTORY_PATH,
    TRAIN_STATE_PATH,
    TrainOutcome,
    check_batch,
    probe_storage,
    quantize_only,
)
from pipeline.storage.lock import Lock, run_lock
from pipeline.storage.shards import Manifest, ShardError, validate_dataset
from pipeline.storage.store import Storage

log = logging.getLogger(__name__)

RUN_CONFIG_PATH = "run.yaml"
METRICS_PATH = "metrics.json"
#: At most this many bad shards are described in the one-line error (the rest are counted).
MAX_SHARDS_LISTED = 3


class RunExistsError(StorageError):
    """The location already holds a run and neither --resume nor --overwrite was given."""


class BadDatasetError(ValueError):
    """Shards of the synthetic dataset failed validation; ``shards`` lists their indices."""

    def __init__(self, message: str, shards: list[int]) -> None:
        super().__init__(message)
        self.shards = shards


# -- checks before any work --------------------------------------------------------------------


def _check_flags(resume: bool, overwrite: bool, repair: bool) -> None:
    if resume and overwrite:
        raise InputError("--resume and --overwrite are mutually exclusive")
    if repair and overwrite:
        raise InputError("--repair and --overwrite are mutually exclusive (--repair continues the run)")


def check_device(cfg: RunConfig, cluster: str | None = None) -> None:
    """``device: cuda`` (or ``ray.use_gpu: yes``) where the run can only have this machine's GPUs
    and it has none: one line before anything is written (not from a generation actor, after
    ``run.yaml`` and the log were written). A Ray cluster elsewhere (``--cluster``, ``ray.address``)
    is not checked: it may scale up GPU nodes on demand."""
    wants_gpu = cfg.device == "cuda" or (cfg.executor == "ray" and cfg.ray.use_gpu == "yes")
    if not wants_gpu or torch.cuda.is_available():
        return
    from pipeline.ray.session import runs_on_this_machine

    if cfg.executor == "ray" and not runs_on_this_machine(cfg, cluster):
        return
    if cfg.device == "cuda":
        asked, instead = "device=cuda", "device=auto or device=cpu"
    else:
        asked, instead = "ray.use_gpu=yes", "ray.use_gpu=auto or ray.use_gpu=no"
    where = "this machine" if cfg.executor == "local" else "this machine (where the run's local Ray runs)"
    raise InputError(
        f"{asked}, but {where} has no CUDA GPU (torch.cuda.is_available() is False); use {instead}, or run on a "
        "GPU cluster (--cluster FILE)"
    )


def check_inputs(ctx: RunContext, *, generate: bool = True, evaluate: bool = True) -> None:
    """Fail with one line on bad input, before anything is started or written.

    Resolves the model and loads the teacher (unknown architecture; missing weights; a checkpoint
    that does not fit, listing missing/unexpected keys; one that needs arbitrary unpickling,
    refused because loading is weights-only; a user's callable that raises), checks the generation
    plan, runs the model check (:func:`intraq_core.preflight.check_model`: one forward of the
    teacher and of the quantized student on 2 random images, on the run's device; BatchNorm and
    the recorded feature when ``generate``) and checks that the test set's
    classes fit the model. Config values (bits, learning rates, batch sizes, iterations, unknown
    keys) were already validated when the config loaded.
    """
    cfg = ctx.cfg
    try:
        ctx.model_cfg  # noqa: B018 - resolves arch, classes, normalization
        ctx.teacher_sha256  # noqa: B018 - builds the teacher with its weights (cached for the stages)
    except (ValueError, OSError) as exc:
        raise InputError(
            f"cannot load the teacher (model.arch={cfg.model.arch!r}, model.weights={cfg.model.weights!r}): "
            f"{first_line(exc)}"
        ) from exc
    if generate:
        from pipeline.stages.plan import make_plan

        try:
            make_plan(cfg, ctx.num_classes)
        except ValueError as exc:
            raise InputError(f"generate.num_images={cfg.generate.num_images}: {first_line(exc)}") from exc
    from intraq_core.preflight import check_model

    device = ctx.driver_device  # device: cuda without a GPU fails here, in one line
    try:
        check_model(ctx.teacher(), ctx.model_cfg, cfg.quant, cfg.generate if generate else None, device=device)
    except ModelError as exc:
        raise InputError(first_line(exc)) from exc
    if evaluate:
        from intraq_core.data import load_test_set

        try:
            load_test_set(cfg.eval, ctx.model_cfg)
        except (ValueError, OSError) as exc:
            raise InputError(f"eval.data={cfg.eval.data!r}: {first_line(exc)}") from exc


def check_location(ctx: RunContext, *, resume: bool, overwrite: bool, probe: bool = True) -> None:
    """The location is writable (``probe``, failing fast: :meth:`~pipeline.storage.store.Storage.fail_fast`)
    and free (or holds this very run, being resumed). Writes nothing but a probe object that it
    deletes again (and the directories it had to create for it)."""
    storage = ctx.storage
    if probe:
        storage.fail_fast().check_writable()
    if not storage.exists(RUN_CONFIG_PATH):
        return
    if not (resume or overwrite):
        raise RunExistsError(
            f"{storage.url} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    if resume:
        import yaml

        prev_cfg = RunConfig.model_validate(yaml.safe_load(storage.read_bytes(RUN_CONFIG_PATH).decode()))
        if prev_cfg.config_hash() != ctx.cfg.config_hash():
            raise RunExistsError(
                f"{storage.url} holds a run of a different config; --resume needs the same config "
                "(use --overwrite or another location)"
            )


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


# -- dataset: generate, validate, repair -------------------------------------------------------


def _bad_shards_message(data: Storage, bad: list[ShardError], *, after_repair: bool) -> str:
    indices = sorted({int(e.shard) for e in bad if e.shard is not None})
    listed = "; ".join(str(e) for e in bad[:MAX_SHARDS_LISTED])
    more = f"; (+{len(bad) - MAX_SHARDS_LISTED} more)" if len(bad) > MAX_SHARDS_LISTED else ""
    head = f"synthetic dataset at {data.url} has {len(indices)} bad shard(s) {indices}"
    if after_repair:
        return f"{head} even after regenerating them: {listed}{more}"
    return f"{head}: {listed}{more}; rerun with --repair to regenerate only those shards"


def drop_bad_shards(
    ctx: RunContext, data: Storage, manifest: Manifest, *, repair: bool, after_repair: bool = False
) -> list[int]:
    """Validate the shards listed in ``manifest`` (reads every one of them).

    All good: returns []. Bad shards without ``repair``: raises :class:`BadDatasetError` naming
    them. With ``repair``: removes only the bad shards from the manifest (saved atomically; no
    file is deleted, the regenerated shard later replaces the bad file) and returns their indices.
    Planned shards that are simply not generated yet are not errors here.
    """
    errors = validate_dataset(data, manifest, {"teacher_sha256": ctx.teacher_sha256})
    listed = {s.index for s in manifest.shards}
    fatal = [e for e in errors if e.shard is None]
    if fatal:
        raise BadDatasetError(f"{first_line(fatal[0])} (not repairable: use another location or --overwrite)", [])
    bad = [e for e in errors if e.shard in listed]
    if not bad:
        return []
    indices = sorted({int(e.shard) for e in bad if e.shard is not None})
    if not repair:
        raise BadDatasetError(_bad_shards_message(data, bad, after_repair=after_repair), indices)
    log.warning(
        "%s",
        f"regenerating {len(indices)} bad shard(s) {indices} of {data.url}: "
        + "; ".join(first_line(e) for e in bad[:MAX_SHARDS_LISTED]),
    )
    manifest.shards = [s for s in manifest.shards if s.index not in indices]
    manifest.save(data)
    return indices


def build_dataset(
    ctx: RunContext, *, repair: bool = False, progress: bool = True, executor: Executor | None = None
) -> tuple[Manifest, GenerationStats, list[int]]:
    """Generate the run's dataset (resuming from its manifest) and return it validated.

    Returns ``(manifest, stats, repaired shard indices)``. When resuming, the finished shards
    are validated first: later rounds compute their MDC centres from them. After generation
    every shard is validated before it can reach training (see :func:`drop_bad_shards`).
    """
    executor = executor or executor_for(ctx.cfg)
    data = dataset_storage(ctx)
    if repair and ctx.cfg.dataset is not None:
        raise InputError(
            f"--repair regenerates this run's own dataset, but the dataset at {data.url} belongs to "
            f"another run location: repair it there (intraq-pipeline generate --repair -o {ctx.cfg.dataset})"
        )
    repaired: list[int] = []
    stats = GenerationStats()
    manifest = Manifest.load(data) if Manifest.exists(data) else None
    ours = (
        manifest is not None
        and manifest.config_hash == ctx.cfg.dataset_hash()
        and manifest.store_dtype == store_dtype(ctx)  # else generation refuses it, naming both dtypes
    )
    if not (ours and manifest.is_complete()):  # a complete dataset of ours goes straight to validation
        if ours and manifest.shards:
            repaired += drop_bad_shards(ctx, data, manifest, repair=repair)
        manifest, more = executor.generate(ctx, progress=progress)
        stats.merge(more)
    dropped = drop_bad_shards(ctx, data, manifest, repair=repair)
    if dropped:
        repaired += dropped
        manifest, more = executor.generate(ctx, progress=progress)
        stats.merge(more)
        drop_bad_shards(ctx, data, manifest, repair=False, after_repair=True)
    return manifest, stats, sorted(set(repaired))


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
    _check_flags(resume, overwrite, repair)
    if dataset is not None:
        cfg = cfg.model_copy(update={"dataset": dataset})
    ctx = RunContext.create(cfg)
    check_device(cfg, cluster)
    ctx.storage.fail_fast().check_reachable()
    run = Run(ctx, command, executor_for(cfg), resume=resume, overwrite=overwrite, repair=repair)
    _check_probe(ctx)
    if command == "train":
        _open_training(run)
        return run
    if command == "run" and cfg.needs_synthetic_data():
        check_batch(cfg, cfg.generate.num_images, source="generate.num_images")
    needs_plan = command == "generate" or (cfg.dataset is None and cfg.needs_synthetic_data())
    check_inputs(ctx, generate=needs_plan, evaluate=command != "generate")
    check_location(ctx, resume=run.continues, overwrite=overwrite)
    return run


def _check_probe(ctx: RunContext) -> None:
    """``distill.probe`` names a location holding a synthetic dataset (checked before any work)."""
    storage = probe_storage(ctx)
    if storage is not None and not Manifest.exists(storage):
        raise InputError(
            f"distill.probe={ctx.cfg.distill.probe}: no synthetic dataset there (data/manifest.json missing); "
            "generate one first (intraq-pipeline generate -o LOCATION)"
        )


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
            f"--repair regenerates this run's own dataset, but the dataset at {dataset_storage(ctx).url} "
            f"belongs to another run location: repair it there (intraq-pipeline generate --repair -o {cfg.dataset})"
        )
    check_inputs(ctx, generate=False, evaluate=True)
    data = dataset_storage(ctx)
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
        source_cfg = _source_config(yaml.safe_load(with_yaml.read_bytes(RUN_CONFIG_PATH)), ctx.cfg, with_yaml)
    ctx.storage.fail_fast().check_writable()
    run.manifest, run.source_cfg = manifest, source_cfg


def _source_config(data: Any, cfg: RunConfig, where: Storage) -> RunConfig:
    """The config that generated a dataset, from its location's ``run.yaml``.

    Only its generation settings matter here (the method and budget in ``metrics.json``). A
    ``run.yaml`` written by another version of the tool (a renamed key elsewhere) still gives
    its ``generate`` section; failing that, this run's own settings are used, with a warning.
    """
    from pydantic import ValidationError

    from intraq_core.config import SynthConfig

    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        try:
            generate = SynthConfig.model_validate((data or {}).get("generate") or {})
        except (ValidationError, AttributeError):
            log.warning(
                "%s",
                f"{where.join(RUN_CONFIG_PATH)} is not readable as a run config; its dataset's "
                f"generation settings are taken from this run's config ({first_line(exc)})",
            )
            return cfg
        return cfg.model_copy(update={"generate": generate})


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


def _generation_context(ctx: RunContext, candidates: list[RunConfig], manifest: Manifest) -> RunContext:
    """A context that regenerates shards of ``manifest`` in the run's own ``data/``: the first
    candidate config whose dataset hash is the manifest's, with this run's storage and executor."""
    for candidate in candidates:
        if candidate.dataset_hash() == manifest.config_hash:
            cfg = candidate.model_copy(
                update={
                    "storage": ctx.cfg.storage,
                    "dataset": None,
                    "executor": ctx.cfg.executor,
                    "ray": ctx.cfg.ray,
                    "device": ctx.cfg.device,
                }
            )
            return RunContext(cfg, ctx.storage)
    raise InputError(
        f"cannot repair {dataset_storage(ctx).url}: neither this config nor the location's run.yaml is the "
        "config that generated it; run `intraq-pipeline generate --repair` with that config"
    )


def _train_stages(run: Run, *, progress: bool) -> dict[str, Any]:
    """``train``: validate (and repair) the dataset, train, evaluate, write metrics.json."""
    ctx, storage, lock = run.ctx, run.ctx.storage, run.lock
    assert run.manifest is not None and run.source_cfg is not None and lock is not None
    manifest, data = run.manifest, dataset_storage(ctx)
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
    repaired = drop_bad_shards(ctx, data, manifest, repair=run.repair)
    gen_stats = None
    if repaired:
        gen_ctx = _generation_context(ctx, [run.source_cfg, ctx.cfg], manifest)
        manifest, gen_stats = run.executor.generate(gen_ctx, progress=progress)
        drop_bad_shards(ctx, data, manifest, repair=False, after_repair=True)
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
    evaluation = evaluate_stage(run.ctx, progress=progress)
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
        "dataset": dataset_storage(ctx).url if manifest is not None else None,
        "training": outcome.summary(),
        "seconds": seconds,
        "dataset_shards": len(manifest.shards) if manifest is not None else 0,
    }
    if gen_stats is not None and run.command == "run":
        metrics["generation"] = gen_stats.summary()
    if repaired:
        metrics["repaired_shards"] = repaired
    return metrics


def evaluate_stage(ctx: RunContext, *, progress: bool) -> dict[str, Any]:
    """FP teacher, calibrated (PTQ on synthetic data) and final student on the real test set."""
    device = ctx.driver_device
    fp = evaluate_model(ctx.teacher(), ctx.model_cfg, ctx.cfg.eval, device=device, progress=progress)
    calibrated, _, _, _ = load_student(ctx.storage.read_bytes(CALIBRATED_PATH))
    ptq = evaluate_model(calibrated, ctx.model_cfg, ctx.cfg.eval, device=device, progress=progress)
    final, _, _, _ = load_student(ctx.storage.read_bytes(STUDENT_PATH))
    same = all(
        torch.equal(a, b) for a, b in zip(final.state_dict().values(), calibrated.state_dict().values(), strict=True)
    )
    # Without distillation, or when the guard kept the start, the final student is the calibrated one.
    quant = ptq if same else evaluate_model(final, ctx.model_cfg, ctx.cfg.eval, device=device, progress=progress)
    return {
        "fp_top1": fp["top1"],
        "ptq_top1": ptq["top1"],
        "quant_top1": quant["top1"],
        "test_images": quant["n"],
        "test_set": ctx.cfg.eval.data,
        "quantization": {"protocol": ctx.cfg.quant.protocol, **quant_map(final)},
    }
