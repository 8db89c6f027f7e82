"""The whole job: generate → quantize + distil → evaluate → ``metrics.json``.

The run location (``storage.url``) holds everything of one run::

    run.yaml                 the resolved config
    LOCK                     lease held while the run is active (see :func:`pipeline.storage.run_lock`)
    data/manifest.json       synthetic dataset (data/shards/*.parquet)
    student_calibrated.pt    quantized student after range calibration (before distillation)
    train_state.pt           local executor: last finished epoch (resume point), weights-only
    ray_train/               Ray executor: Ray Train's epoch checkpoints (resume point)
    student.pt               final student (weights-only loadable)
    train_history.json       per-epoch distillation statistics
    metrics.json             the numbers (written last)

Failure and recovery (README "Failure and recovery"):

* Bad input is found by :func:`preflight` before Ray starts and before the location is touched:
  nothing is created, deleted or overwritten by a refused command.
* The run lock is a short lease refreshed by a heartbeat while the run lives; a crashed run's
  lock is taken over at once on the same host (its pid is gone), elsewhere when the lease ends.
* Every shard is validated (:func:`pipeline.shards.validate_dataset`) before training, and
  before a resumed generation uses finished shards for later rounds' MDC centres. A bad shard
  is an error naming it; ``repair=True`` (``--repair``) drops only the bad shards from the
  manifest and regenerates them. Generation is deterministic per shard (fixed labels and seeds,
  MDC centres from the features of earlier rounds, which are validated), so a repaired shard is
  byte-identical to the original and later rounds, generated from the original, stay valid.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from intraq_core.student import load_student
from pipeline.config import RunConfig
from pipeline.context import RunContext
from pipeline.errors import InputError
from pipeline.evaluate import evaluate_model
from pipeline.generate import GenerationStats, dataset_storage, generate_local
from pipeline.methods import generation_budget, run_method
from pipeline.shards import Manifest, ShardError, validate_dataset
from pipeline.storage import Lock, Storage, StorageError, run_lock
from pipeline.train import CALIBRATED_PATH, STUDENT_PATH, TRAIN_STATE_PATH, TrainOutcome, quantize_only, train_local

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_inputs(ctx: RunContext, *, generate: bool = True, evaluate: bool = True) -> None:
    """Fail with one line on bad input, before anything is started or written.

    Resolves the model and loads the teacher (unknown architecture; missing weights; a checkpoint
    that does not fit, listing missing/unexpected keys; one that needs arbitrary unpickling,
    refused because loading is weights-only), checks the generation plan (fewer images than
    classes) and that the test set's classes fit the model. Config values (bits, learning
    rates, batch sizes, iterations, unknown keys) were already validated when the config loaded.
    """
    cfg = ctx.cfg
    try:
        ctx.model_cfg  # noqa: B018 - resolves arch, classes, normalization
        ctx.teacher_sha256  # noqa: B018 - builds the teacher with its weights (cached for the stages)
    except (ValueError, OSError) as exc:
        raise InputError(
            f"cannot load the teacher (model.arch={cfg.model.arch!r}, model.weights={cfg.model.weights!r}): "
            f"{_first_line(exc)}"
        ) from exc
    if generate:
        from intraq_core.synth.engine import check_teacher
        from pipeline.plan import make_plan

        try:
            make_plan(cfg, ctx.num_classes)
        except ValueError as exc:
            raise InputError(f"generate.num_images={cfg.generate.num_images}: {_first_line(exc)}") from exc
        try:
            check_teacher(ctx.teacher(), cfg.generate)  # no BatchNorm for a method that needs BN statistics
        except ValueError as exc:
            raise InputError(_first_line(exc)) from exc
    if evaluate:
        from intraq_core.data import load_test_set

        try:
            load_test_set(cfg.eval, ctx.model_cfg)
        except (ValueError, OSError) as exc:
            raise InputError(f"eval.data={cfg.eval.data!r}: {_first_line(exc)}") from exc


def check_location(ctx: RunContext, *, resume: bool, overwrite: bool) -> None:
    """The location is writable and free (or holds this very run, being resumed). Writes nothing
    but a probe object that it deletes again."""
    storage = ctx.storage
    storage.check_writable()
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


def preflight(
    cfg: RunConfig, command: str = "run", *, resume: bool = False, overwrite: bool = False, repair: bool = False
) -> RunContext:
    """All checks of ``command`` (run, generate, train) that need no lock; touches nothing.

    The CLI calls it before starting Ray, so bad input fails in a second, not after a cluster
    start. The stages repeat the checks themselves (they are cheap).
    """
    _check_flags(resume, overwrite, repair)
    ctx = RunContext.create(cfg)
    needs_plan = command == "generate" or (command == "run" and cfg.dataset is None and cfg.needs_synthetic_data())
    check_inputs(ctx, generate=needs_plan, evaluate=command != "generate")
    if command == "train":
        ctx.storage.check_writable()
    else:
        check_location(ctx, resume=resume or repair, overwrite=overwrite)
    return ctx


def prepare_location(ctx: RunContext, *, resume: bool, overwrite: bool) -> None:
    """Check the run location is writable and free (or being resumed), then record the config."""
    storage = ctx.storage
    check_location(ctx, resume=resume, overwrite=overwrite)
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


def _generate(ctx: RunContext, *, progress: bool) -> tuple[Manifest, GenerationStats]:
    if ctx.cfg.executor == "ray":
        from pipeline.ray_generate import generate_ray

        return generate_ray(ctx, progress=progress)
    return generate_local(ctx, progress=progress)


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
        raise BadDatasetError(f"{_first_line(fatal[0])} (not repairable: use another location or --overwrite)", [])
    bad = [e for e in errors if e.shard in listed]
    if not bad:
        return []
    indices = sorted({int(e.shard) for e in bad if e.shard is not None})
    if not repair:
        raise BadDatasetError(_bad_shards_message(data, bad, after_repair=after_repair), indices)
    log.warning(
        "%s",
        f"regenerating {len(indices)} bad shard(s) {indices} of {data.url}: "
        + "; ".join(_first_line(e) for e in bad[:MAX_SHARDS_LISTED]),
    )
    manifest.shards = [s for s in manifest.shards if s.index not in indices]
    manifest.save(data)
    return indices


def build_dataset(
    ctx: RunContext, *, repair: bool = False, progress: bool = True
) -> tuple[Manifest, GenerationStats, list[int]]:
    """Generate the run's dataset (resuming from its manifest) and return it validated.

    Returns ``(manifest, stats, repaired shard indices)``. When resuming, the finished shards
    are validated first: later rounds compute their MDC centres from them. After generation
    every shard is validated before it can reach training (see :func:`drop_bad_shards`).
    """
    data = dataset_storage(ctx)
    if repair and ctx.cfg.dataset is not None:
        raise InputError(
            f"--repair regenerates this run's own dataset, but the dataset at {data.url} belongs to "
            f"another run location: repair it there (intraq-pipeline generate --repair -o {ctx.cfg.dataset})"
        )
    repaired: list[int] = []
    stats = GenerationStats()
    manifest = Manifest.load(data) if Manifest.exists(data) else None
    ours = manifest is not None and manifest.config_hash == ctx.cfg.dataset_hash()
    if not (ours and manifest.is_complete()):  # a complete dataset of ours goes straight to validation
        if ours and manifest.shards:
            repaired += drop_bad_shards(ctx, data, manifest, repair=repair)
        manifest, more = _generate(ctx, progress=progress)
        stats.merge(more)
    dropped = drop_bad_shards(ctx, data, manifest, repair=repair)
    if dropped:
        repaired += dropped
        manifest, more = _generate(ctx, progress=progress)
        stats.merge(more)
        drop_bad_shards(ctx, data, manifest, repair=False, after_repair=True)
    return manifest, stats, sorted(set(repaired))


# -- stages ------------------------------------------------------------------------------------


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
    _check_flags(resume, overwrite, repair)
    ctx = RunContext.create(cfg)
    check_inputs(ctx, generate=cfg.dataset is None and cfg.needs_synthetic_data(), evaluate=True)
    check_location(ctx, resume=resume or repair, overwrite=overwrite)
    with run_lock(ctx.storage) as lock:
        prepare_location(ctx, resume=resume or repair, overwrite=overwrite)
        return _run_stages(ctx, lock, repair=repair, progress=progress)


def generate_stage(
    cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, repair: bool = False, progress: bool = True
) -> Manifest:
    """Generate the synthetic dataset only (``intraq-pipeline generate``), holding the run lock.

    The dataset is validated at the end (bad shards: an error naming them); with ``repair`` only
    the bad shards are regenerated.
    """
    _check_flags(resume, overwrite, repair)
    ctx = RunContext.create(cfg)
    check_inputs(ctx, generate=True, evaluate=False)
    check_location(ctx, resume=resume or repair, overwrite=overwrite)
    with run_lock(ctx.storage):
        prepare_location(ctx, resume=resume or repair, overwrite=overwrite)
        manifest, _, _ = build_dataset(ctx, repair=repair, progress=progress)
    return manifest


#: What the training stage writes (replaced by ``train --overwrite``, the dataset is kept).
TRAIN_OUTPUTS = (CALIBRATED_PATH, STUDENT_PATH, "train_history.json", METRICS_PATH, "ray_train", TRAIN_STATE_PATH)


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
    import yaml

    from pipeline.shards import read_shard

    _check_flags(resume, overwrite, repair)
    if dataset is not None:
        cfg = cfg.model_copy(update={"dataset": dataset})
    ctx = RunContext.create(cfg)
    if cfg.dataset is not None:
        other = Storage.from_config(cfg.storage.model_copy(update={"url": cfg.dataset}))
        if other.url.rstrip("/") == ctx.storage.url.rstrip("/"):
            ctx = RunContext.create(cfg.model_copy(update={"dataset": None}))
    own = ctx.cfg.dataset is None
    if repair and not own:
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
    if manifest.shards:
        try:
            meta = read_shard(data, manifest.shards[0].path).meta
        except (ShardError, FileNotFoundError):
            meta = {}  # reported, with every other problem, by the validation below
        if meta.get("teacher_sha256") not in (None, ctx.teacher_sha256):
            raise StorageError(f"{data.url} was synthesized from another teacher than model.weights")
    source_cfg = ctx.cfg
    dataset_root = data.url.rstrip("/").rsplit("/", 1)[0]
    with_yaml = Storage.from_config(cfg.storage.model_copy(update={"url": dataset_root}))
    if with_yaml.exists(RUN_CONFIG_PATH):
        source_cfg = RunConfig.model_validate(yaml.safe_load(with_yaml.read_bytes(RUN_CONFIG_PATH)))

    storage = ctx.storage
    storage.check_writable()
    with run_lock(storage) as lock:
        if own:
            trained = [p for p in TRAIN_OUTPUTS if storage.exists(p)]
            if trained and not (resume or overwrite or repair):
                raise RunExistsError(
                    f"{storage.url} already holds a trained student; pass --resume to continue it or "
                    "--overwrite to retrain (the dataset is kept)"
                )
        else:
            check_location(ctx, resume=resume or repair, overwrite=overwrite)
        # Validate (and repair) before anything at the location is written.
        repaired = drop_bad_shards(ctx, data, manifest, repair=repair)
        if repaired:
            gen_ctx = _generation_context(ctx, [source_cfg, ctx.cfg], manifest)
            manifest, _ = _generate(gen_ctx, progress=progress)
            drop_bad_shards(ctx, data, manifest, repair=False, after_repair=True)
        if own:
            if overwrite:
                for rel in trained:
                    storage.delete(rel, recursive=True)
            storage.write_bytes_atomic(RUN_CONFIG_PATH, ctx.cfg.to_yaml().encode())
        else:
            prepare_location(ctx, resume=resume or repair, overwrite=overwrite)
        t0 = time.perf_counter()
        outcome = _train(ctx, manifest, progress=progress)
        seconds = {
            "calibrate": outcome.seconds_calibrate,
            "distill": outcome.seconds_distill,
            "train_total": time.perf_counter() - t0,
        }
        lock.check()
        t0 = time.perf_counter()
        metrics = evaluate_stage(ctx, progress=progress)
        seconds["evaluate"] = time.perf_counter() - t0
        gen_cfg = source_cfg.model_copy(update={"quant": ctx.cfg.quant, "distill": ctx.cfg.distill})
        metrics.update(
            {
                "method": run_method(gen_cfg),
                "w_bits": ctx.cfg.quant.w_bits,
                "a_bits": ctx.cfg.quant.a_bits,
                "num_images": manifest.rows,
                "gen_iterations": generation_budget(source_cfg)["gen_iterations"],
                "generator_iterations": generation_budget(source_cfg)["generator_iterations"],
                "epochs": ctx.cfg.distill.epochs,
                "seed": ctx.cfg.seed,
                "executor": ctx.cfg.executor,
                "device": str(ctx.device),
                "config_hash": ctx.cfg.config_hash(),
                "dataset_hash": manifest.config_hash,
                "dataset": data.url,
                "training": outcome.summary(),
                "seconds": seconds,
                "dataset_shards": len(manifest.shards),
            }
        )
        if repaired:
            metrics["repaired_shards"] = repaired
        lock.check()
        storage.write_json_atomic(METRICS_PATH, metrics)
    return metrics


def _train(ctx: RunContext, manifest: Manifest | None, *, progress: bool) -> TrainOutcome:
    """The training stage on the chosen executor; no dataset: the data-free student only.

    Without distillation (``distill.epochs: 0``) there is nothing for Ray Train to distribute, so
    calibration runs in this process whatever the executor.
    """
    if manifest is None:
        return quantize_only(ctx)
    if ctx.cfg.executor == "ray" and ctx.cfg.distill.epochs > 0:
        from pipeline.ray_train import train_ray

        return train_ray(ctx, manifest, progress=progress)
    return train_local(ctx, manifest, progress=progress)


def _run_stages(ctx: RunContext, lock: Lock, *, repair: bool, progress: bool) -> dict[str, Any]:
    cfg = ctx.cfg
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    manifest: Manifest | None = None
    gen_stats, repaired = GenerationStats(), []
    if cfg.needs_synthetic_data():
        manifest, gen_stats, repaired = build_dataset(ctx, repair=repair, progress=progress)
    seconds["generate"] = time.perf_counter() - t0
    lock.check()

    t0 = time.perf_counter()
    outcome = _train(ctx, manifest, progress=progress)
    seconds["calibrate"] = outcome.seconds_calibrate
    seconds["distill"] = outcome.seconds_distill
    seconds["train_total"] = time.perf_counter() - t0
    lock.check()

    t0 = time.perf_counter()
    metrics = evaluate_stage(ctx, progress=progress)
    seconds["evaluate"] = time.perf_counter() - t0

    metrics.update(
        {
            "method": run_method(cfg),
            "w_bits": cfg.quant.w_bits,
            "a_bits": cfg.quant.a_bits,
            **generation_budget(cfg),
            "epochs": cfg.distill.epochs,
            "seed": cfg.seed,
            "executor": cfg.executor,
            "device": str(ctx.device),
            "config_hash": cfg.config_hash(),
            "dataset_hash": cfg.dataset_hash() if manifest is not None else None,
            "generation": gen_stats.summary(),
            "training": outcome.summary(),
            "seconds": seconds,
        }
    )
    metrics["dataset_shards"] = len(manifest.shards) if manifest is not None else 0
    if repaired:
        metrics["generation"]["repaired_shards"] = repaired
    lock.check()
    ctx.storage.write_json_atomic(METRICS_PATH, metrics)
    return metrics


def evaluate_stage(ctx: RunContext, *, progress: bool) -> dict[str, Any]:
    """FP teacher, calibrated (PTQ on synthetic data) and final student on the real test set."""
    device = ctx.device
    fp = evaluate_model(ctx.teacher(), ctx.model_cfg, ctx.cfg.eval, device=device, progress=progress)
    calibrated, _, _, _ = load_student(ctx.storage.read_bytes(CALIBRATED_PATH))
    ptq = evaluate_model(calibrated, ctx.model_cfg, ctx.cfg.eval, device=device, progress=progress)
    final, _, _, _ = load_student(ctx.storage.read_bytes(STUDENT_PATH))
    same = ctx.cfg.distill.epochs == 0 and all(
        torch.equal(a, b) for a, b in zip(final.state_dict().values(), calibrated.state_dict().values(), strict=True)
    )
    # Without distillation the final student is the calibrated one: evaluated once.
    quant = ptq if same else evaluate_model(final, ctx.model_cfg, ctx.cfg.eval, device=device, progress=progress)
    return {
        "fp_top1": fp["top1"],
        "ptq_top1": ptq["top1"],
        "quant_top1": quant["top1"],
        "test_images": quant["n"],
        "test_set": ctx.cfg.eval.data,
    }


def load_metrics(ctx: RunContext) -> dict[str, Any]:
    return json.loads(ctx.storage.read_bytes(METRICS_PATH))


def dataset_manifest(ctx: RunContext) -> Manifest:
    from pipeline.generate import dataset_storage

    return Manifest.load(dataset_storage(ctx))
