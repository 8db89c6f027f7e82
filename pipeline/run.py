"""The whole job: generate → quantize + distil → evaluate → ``metrics.json``.

The run location (``storage.url``) holds everything of one run::

    run.yaml                 the resolved config
    LOCK                     lease held while the run is active
    data/manifest.json       synthetic dataset (data/shards/*.parquet)
    student_calibrated.pt    quantized student after range calibration (before distillation)
    student.pt               final student (weights-only loadable)
    train_history.json       per-epoch distillation statistics
    metrics.json             the numbers (written last)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from intraq_core.student import load_student
from pipeline.config import RunConfig
from pipeline.context import RunContext
from pipeline.evaluate import evaluate_model
from pipeline.generate import generate_local
from pipeline.shards import Manifest
from pipeline.storage import StorageError
from pipeline.train import CALIBRATED_PATH, STUDENT_PATH, train_local

log = logging.getLogger(__name__)

RUN_CONFIG_PATH = "run.yaml"
METRICS_PATH = "metrics.json"


class RunExistsError(StorageError):
    """The location already holds a run and neither --resume nor --overwrite was given."""


def prepare_location(ctx: RunContext, *, resume: bool, overwrite: bool) -> None:
    """Check the run location is writable and free (or being resumed), then record the config."""
    storage = ctx.storage
    storage.check_writable()
    has_run = storage.exists(RUN_CONFIG_PATH)
    if has_run and not (resume or overwrite):
        raise RunExistsError(
            f"{storage.url} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    if has_run and resume:
        previous = storage.read_bytes(RUN_CONFIG_PATH).decode()
        import yaml

        prev_cfg = RunConfig.model_validate(yaml.safe_load(previous))
        if prev_cfg.config_hash() != ctx.cfg.config_hash():
            raise RunExistsError(
                f"{storage.url} holds a run of a different config; --resume needs the same config "
                "(use --overwrite or another location)"
            )
    if has_run and overwrite:
        for rel in storage.ls(""):
            name = rel.rstrip("/").rsplit("/", 1)[-1]
            if name != "LOCK":
                storage.delete(name, recursive=True)
    storage.write_bytes_atomic(RUN_CONFIG_PATH, ctx.cfg.to_yaml().encode())


def run_pipeline(
    cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run every stage and return the metrics (also written to ``metrics.json``)."""
    ctx = RunContext.create(cfg)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    ctx.storage.check_writable()
    with ctx.storage.acquire_lock(owner=owner, ttl_s=3600.0):
        prepare_location(ctx, resume=resume, overwrite=overwrite)
        return _run_stages(ctx, progress=progress)


def generate_stage(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Manifest:
    """Generate the synthetic dataset only (``intraq-pipeline generate``), holding the run lock."""
    ctx = RunContext.create(cfg)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    ctx.storage.check_writable()
    with ctx.storage.acquire_lock(owner=owner, ttl_s=3600.0):
        prepare_location(ctx, resume=resume, overwrite=overwrite)
        if cfg.executor == "ray":
            from pipeline.ray_generate import generate_ray

            manifest, _ = generate_ray(ctx, progress=progress)
        else:
            manifest, _ = generate_local(ctx, progress=progress)
    return manifest


#: What the training stage writes (replaced by ``train --overwrite``, the dataset is kept).
TRAIN_OUTPUTS = (CALIBRATED_PATH, STUDENT_PATH, "train_history.json", METRICS_PATH, "ray_train")


def train_stage(
    cfg: RunConfig,
    *,
    dataset: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize, calibrate and distil on an existing synthetic dataset, then evaluate.

    The dataset is ``dataset`` (a run location), else ``cfg.dataset``, else the run location's
    own ``data/`` (from ``intraq-pipeline generate``). Training on the location's own dataset
    keeps it: ``--overwrite`` then replaces only the training outputs. The dataset's generation
    settings need not be repeated in ``cfg``; its model must be the same teacher. ``--resume``
    continues an interrupted Ray training from its last epoch checkpoint.
    """
    import yaml

    from pipeline.generate import dataset_storage
    from pipeline.shards import read_shard
    from pipeline.storage import Storage

    if resume and overwrite:
        raise ValueError("--resume and --overwrite are mutually exclusive")
    if dataset is not None:
        cfg = cfg.model_copy(update={"dataset": dataset})
    ctx = RunContext.create(cfg)
    if cfg.dataset is not None:
        other = Storage.from_config(cfg.storage.model_copy(update={"url": cfg.dataset}))
        if other.url.rstrip("/") == ctx.storage.url.rstrip("/"):
            ctx = RunContext.create(cfg.model_copy(update={"dataset": None}))
    own = ctx.cfg.dataset is None
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
        meta = read_shard(data, manifest.shards[0].path).meta
        if meta.get("teacher_sha256") not in (None, ctx.teacher_sha256):
            raise StorageError(f"{data.url} was synthesized from another teacher than model.weights")
    source_cfg = ctx.cfg
    dataset_root = data.url.rstrip("/").rsplit("/", 1)[0]
    with_yaml = Storage.from_config(cfg.storage.model_copy(update={"url": dataset_root}))
    if with_yaml.exists(RUN_CONFIG_PATH):
        source_cfg = RunConfig.model_validate(yaml.safe_load(with_yaml.read_bytes(RUN_CONFIG_PATH)))

    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    storage = ctx.storage
    storage.check_writable()
    with storage.acquire_lock(owner=owner, ttl_s=3600.0):
        if own:
            trained = [p for p in TRAIN_OUTPUTS if storage.exists(p)]
            if trained and not (resume or overwrite):
                raise RunExistsError(
                    f"{storage.url} already holds a trained student; pass --resume to continue it or "
                    "--overwrite to retrain (the dataset is kept)"
                )
            if overwrite:
                for rel in trained:
                    storage.delete(rel, recursive=True)
            storage.write_bytes_atomic(RUN_CONFIG_PATH, ctx.cfg.to_yaml().encode())
        else:
            prepare_location(ctx, resume=resume, overwrite=overwrite)
        t0 = time.perf_counter()
        if ctx.cfg.executor == "ray":
            from pipeline.ray_train import train_ray

            outcome = train_ray(ctx, manifest, progress=progress)
        else:
            outcome = train_local(ctx, manifest, progress=progress)
        seconds = {
            "calibrate": outcome.seconds_calibrate,
            "distill": outcome.seconds_distill,
            "train_total": time.perf_counter() - t0,
        }
        t0 = time.perf_counter()
        metrics = evaluate_stage(ctx, progress=progress)
        seconds["evaluate"] = time.perf_counter() - t0
        gen = source_cfg.generate
        metrics.update(
            {
                "method": gen.method,
                "w_bits": ctx.cfg.quant.w_bits,
                "a_bits": ctx.cfg.quant.a_bits,
                "num_images": manifest.rows,
                "gen_iterations": gen.iterations if gen.optimizes else 0,
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
        storage.write_json_atomic(METRICS_PATH, metrics)
    return metrics


def _run_stages(ctx: RunContext, *, progress: bool) -> dict[str, Any]:
    cfg = ctx.cfg
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if cfg.executor == "ray":
        from pipeline.ray_generate import generate_ray

        manifest, gen_stats = generate_ray(ctx, progress=progress)
    else:
        manifest, gen_stats = generate_local(ctx, progress=progress)
    seconds["generate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if cfg.executor == "ray":
        from pipeline.ray_train import train_ray

        outcome = train_ray(ctx, manifest, progress=progress)
    else:
        outcome = train_local(ctx, manifest, progress=progress)
    seconds["calibrate"] = outcome.seconds_calibrate
    seconds["distill"] = outcome.seconds_distill
    seconds["train_total"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics = evaluate_stage(ctx, progress=progress)
    seconds["evaluate"] = time.perf_counter() - t0

    metrics.update(
        {
            "method": cfg.generate.method,
            "w_bits": cfg.quant.w_bits,
            "a_bits": cfg.quant.a_bits,
            "num_images": cfg.generate.num_images,
            "gen_iterations": cfg.generate.iterations if cfg.generate.optimizes else 0,
            "epochs": cfg.distill.epochs,
            "seed": cfg.seed,
            "executor": cfg.executor,
            "device": str(ctx.device),
            "config_hash": cfg.config_hash(),
            "dataset_hash": cfg.dataset_hash(),
            "generation": gen_stats.summary(),
            "training": outcome.summary(),
            "seconds": seconds,
        }
    )
    metrics["dataset_shards"] = len(manifest.shards)
    ctx.storage.write_json_atomic(METRICS_PATH, metrics)
    return metrics


def evaluate_stage(ctx: RunContext, *, progress: bool) -> dict[str, Any]:
    """FP teacher, calibrated (PTQ on synthetic data) and final student on the real test set."""
    device = ctx.device
    fp = evaluate_model(ctx.teacher(), ctx.model_cfg, ctx.cfg.eval, device=device, progress=progress)
    calibrated, _, _, _ = load_student(ctx.storage.read_bytes(CALIBRATED_PATH))
    ptq = evaluate_model(calibrated, ctx.model_cfg, ctx.cfg.eval, device=device, progress=progress)
    final, _, _, _ = load_student(ctx.storage.read_bytes(STUDENT_PATH))
    quant = evaluate_model(final, ctx.model_cfg, ctx.cfg.eval, device=device, progress=progress)
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
