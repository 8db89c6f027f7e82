"""The run's synthetic dataset: generated (or resumed), every shard validated, bad shards repaired.

Every shard is validated (:func:`pipeline.storage.manifest.validate_dataset`) before training, and
before a resumed generation uses finished shards for later rounds' MDC centres. A bad shard is an
error naming it; ``repair=True`` (``--repair``) drops only the bad shards from the manifest and
regenerates them (byte-identical: generation is deterministic per shard). A dataset of another
location (``train --dataset``) is described by its location's ``run.yaml`` (:func:`source_config`).
"""

from __future__ import annotations

import logging
from typing import Any

from intraq_core.errors import first_line
from pipeline.config import RUN_CONFIG_PATH, RunConfig
from pipeline.context import RunContext
from pipeline.errors import BadDatasetError, InputError
from pipeline.run.executor import Executor, executor_for
from pipeline.stages.generate import GenerationStats, store_dtype
from pipeline.storage.manifest import Manifest, validate_dataset
from pipeline.storage.shards import ShardError
from pipeline.storage.store import Storage

log = logging.getLogger(__name__)

#: At most this many bad shards are described in the one-line error (the rest are counted).
MAX_SHARDS_LISTED = 3


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
    data = ctx.dataset_storage
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
    manifest, more, dropped = validate_or_repair(
        ctx, data, manifest, repair=repair, progress=progress, executor=executor
    )
    if more is not None:
        stats.merge(more)
    return manifest, stats, sorted(set(repaired + dropped))


def validate_or_repair(
    ctx: RunContext,
    data: Storage,
    manifest: Manifest,
    *,
    repair: bool,
    progress: bool,
    executor: Executor,
    sources: list[RunConfig] | None = None,
) -> tuple[Manifest, GenerationStats | None, list[int]]:
    """Every listed shard validated (:func:`drop_bad_shards`); with ``repair`` the bad ones regenerated, then
    validated again. Returns ``(manifest, stats of the regeneration or None, repaired shard indices)``.

    The shards are regenerated by ``ctx``, or, for a dataset another config may have generated
    (``train``), by the first of ``sources`` that did (:func:`generation_context`).
    """
    repaired = drop_bad_shards(ctx, data, manifest, repair=repair)
    if not repaired:
        return manifest, None, []
    gen_ctx = ctx if sources is None else generation_context(ctx, sources, manifest)
    manifest, stats = executor.generate(gen_ctx, progress=progress)
    drop_bad_shards(ctx, data, manifest, repair=False, after_repair=True)
    return manifest, stats, repaired


def source_config(data: Any, cfg: RunConfig, where: Storage) -> RunConfig:
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


def generation_context(ctx: RunContext, candidates: list[RunConfig], manifest: Manifest) -> RunContext:
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
        f"cannot repair {ctx.dataset_storage.url}: neither this config nor the location's run.yaml is the "
        "config that generated it; run `intraq-pipeline generate --repair` with that config"
    )
