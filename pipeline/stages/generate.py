"""Generation stage: shard tasks → Parquet shards + manifest, round by round.

Every shard of round r is optimized against the MDC class centres of all images of
rounds < r (a snapshot taken when the round starts), and centres are updated in shard
order when the round ends; so the same config and seed give the same shards whatever
the number of actors. Shards become visible only through the manifest, which is
rewritten atomically after each finished shard; re-running skips listed shards.

Two executors share this logic: ``local`` (one process, the laptop/debug path) and
``ray`` (a pool of actors, see :mod:`pipeline.ray.generate`).

Generator methods (``gdfq``, ``qimera``) first train their generator
(:mod:`pipeline.stages.generator_training`, resumable); their shards are then sampled from it through the
same shard tasks, files and manifest (:func:`make_synthesizer`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from intraq_core.synth.centres import ClassCentres
from intraq_core.synth.engine import Synthesizer, SynthResult
from intraq_core.synth.generator import GeneratorSampler
from pipeline.context import RunContext, kill_point
from pipeline.errors import GenerationError
from pipeline.stages.generator_training import make_sampler, train_generator
from pipeline.stages.plan import ShardTask, make_plan, packs, rounds
from pipeline.storage.manifest import Manifest
from pipeline.storage.shards import ShardInfo, read_shard, write_shard
from pipeline.storage.store import Storage

log = logging.getLogger(__name__)

HISTORY_EVERY = 10


@dataclass
class ShardOutcome:
    """What a finished shard reports back: its manifest record and its clean features."""

    info: ShardInfo
    round: int
    features: np.ndarray
    labels: np.ndarray
    final: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    image_iterations: int = 0


def make_synthesizer(ctx: RunContext, storage: Storage) -> Synthesizer | GeneratorSampler:
    """What produces the run's shards: the pixel optimizer, or the trained generator's sampler."""
    if ctx.cfg.generate.uses_generator:
        return make_sampler(ctx, storage)
    return Synthesizer(
        ctx.teacher(),
        ctx.cfg.generate,
        image_shape=ctx.image_shape,
        num_classes=ctx.num_classes,
        device=ctx.device,
        normalization=ctx.normalization,
    )


def store_dtype(ctx: RunContext) -> str:
    """The pixel dtype of the run's shards: ``generate.store_dtype`` resolved for its image size."""
    return ctx.cfg.generate.shard_dtype(max(ctx.image_shape[1:]))


def shard_meta(ctx: RunContext, task: ShardTask, result: SynthResult) -> dict[str, Any]:
    """File metadata of a shard: what produced it and how to read it.

    Only deterministic values (no wall-clock times), so the same config and seed give
    byte-identical shard files.
    """
    m = ctx.model_cfg
    return {
        "round": task.round,
        "config_hash": ctx.cfg.dataset_hash(),
        "teacher_sha256": ctx.teacher_sha256,
        "mean": list(m.mean or ()),
        "std": list(m.std or ()),
        "num_classes": ctx.num_classes,
        "image_shape": list(ctx.image_shape),
        "seed": task.batch_seed,
        "method": ctx.cfg.generate.method,
        "final_losses": result.final,
        "loss_history": loss_history(result),
    }


def loss_history(result: SynthResult) -> dict[str, Any]:
    """Every term's value each ``HISTORY_EVERY`` iterations and at the last one, for reports.

    ``{"iteration": [0, 10, …, n-1], "terms": {name: [value, …]}}``; a non-finite value is
    stored as None (shard metadata is strict JSON).
    """
    n = max((len(v) for v in result.history.values()), default=0)
    steps = list(range(0, n, HISTORY_EVERY))
    if n and steps[-1] != n - 1:
        steps.append(n - 1)
    terms = {
        name: [float(v[i]) if i < len(v) and math.isfinite(v[i]) else None for i in steps]
        for name, v in result.history.items()
    }
    return {"iteration": steps, "terms": terms}


def synthesize_shards(
    synth: Synthesizer | GeneratorSampler,
    ctx: RunContext,
    storage: Storage,
    tasks: list[ShardTask],
    centres_state: dict[str, np.ndarray] | None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> list[ShardOutcome]:
    """Optimize a pack of shards of one round in one pass (one shard, usually) and write each one.

    The unit of work of every executor (:func:`optimize_shards`, then :func:`write_shards`; a Ray
    actor calls the two apart, so it writes a pack while it optimizes the next).
    """
    return write_shards(ctx, storage, tasks, optimize_shards(synth, tasks, centres_state, progress))


def optimize_shards(
    synth: Synthesizer | GeneratorSampler,
    tasks: list[ShardTask],
    centres_state: dict[str, np.ndarray] | None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> list[SynthResult]:
    """The images of a pack of shards of one round, optimized in one pass against the round's centres.

    A pack of several (``generate.groups_per_pass``) runs through :meth:`Synthesizer.synthesize_groups`,
    each shard with its own loss.
    """
    centres = None
    if centres_state is not None:
        store = ClassCentres.from_state(centres_state)
        if store.counts.any():
            centres = store.snapshot()
    groups = [
        (torch.tensor(t.labels, dtype=torch.int64), torch.tensor(t.image_seeds, dtype=torch.int64), t.batch_seed)
        for t in tasks
    ]
    if len(groups) == 1:
        return [synth.synthesize(*groups[0], centres, progress=progress)]
    if isinstance(synth, Synthesizer):
        return synth.synthesize_groups(groups, centres, progress=progress)
    raise GenerationError("packed shards need the pixel optimizer (generate.groups_per_pass=1 for generators)")


def write_shards(
    ctx: RunContext, storage: Storage, tasks: list[ShardTask], results: list[SynthResult]
) -> list[ShardOutcome]:
    """Write the shards of a pack (:func:`optimize_shards`); their outcomes, in the pack's order."""
    return [_write(ctx, storage, task, result) for task, result in zip(tasks, results, strict=True)]


def _write(ctx: RunContext, storage: Storage, task: ShardTask, result: SynthResult) -> ShardOutcome:
    """Write one finished shard; its outcome for the manifest and the centre store."""
    info = write_shard(
        storage,
        task.index,
        result.images.numpy(),
        result.labels.numpy(),
        result.seeds.numpy(),
        np.asarray(list(task.indices), dtype=np.int64),
        shard_meta(ctx, task, result),
        features=result.features.numpy(),
        store_dtype=store_dtype(ctx),
    )
    history = {k: v[::HISTORY_EVERY] + v[-1:] for k, v in result.history.items()}
    return ShardOutcome(
        info,
        task.round,
        result.features.numpy(),
        result.labels.numpy(),
        result.final,
        history,
        result.seconds,
        result.images.shape[0] * result.iterations,
    )


def new_manifest(ctx: RunContext, num_shards: int) -> Manifest:
    m = ctx.model_cfg
    return Manifest(
        config_hash=ctx.cfg.dataset_hash(),
        num_shards_planned=num_shards,
        image_shape=list(ctx.image_shape),
        num_classes=ctx.num_classes,
        mean=list(m.mean or ()),
        std=list(m.std or ()),
        store_dtype=store_dtype(ctx),
    )


def open_manifest(ctx: RunContext, storage: Storage, num_shards: int) -> Manifest:
    """The existing manifest of this dataset, or a new one; another run's dataset is an error.

    So is one whose shards store pixels in another dtype (written before ``store_dtype: auto``
    chose float16 for large images, or with another ``store_dtype``): its shards are never mixed
    with this run's."""
    if Manifest.exists(storage):
        manifest = Manifest.load(storage)
        if manifest.config_hash != ctx.cfg.dataset_hash():
            raise GenerationError(
                f"{storage.url} holds a synthetic dataset of another config (hash {manifest.config_hash}, "
                f"this run {ctx.cfg.dataset_hash()}); use another storage location or --overwrite"
            )
        ours = store_dtype(ctx)
        if manifest.store_dtype != ours:
            raise GenerationError(
                f"{storage.url} holds a synthetic dataset stored in {manifest.store_dtype}, this run stores "
                f"{ours} (generate.store_dtype={ctx.cfg.generate.store_dtype}); set "
                f"generate.store_dtype={manifest.store_dtype} to continue it, or use another storage location "
                "or --overwrite"
            )
        return manifest
    return new_manifest(ctx, num_shards)


def pending_work(ctx: RunContext, storage: Storage) -> tuple[list[ShardTask], Manifest, list[ShardTask]]:
    """The plan's shard tasks, the (resumed or new) manifest, and the tasks it does not list yet.

    When nothing is left the manifest is saved again (marking it complete), so re-running a
    finished generation does no work."""
    tasks = make_plan(ctx.cfg, ctx.num_classes)
    manifest = open_manifest(ctx, storage, len(tasks))
    todo = [t for t in tasks if manifest.shard(t.index) is None]
    if not todo:
        manifest.save(storage)
    return tasks, manifest, todo


def centres_before_round(
    storage: Storage,
    manifest: Manifest,
    round_index: int,
    num_classes: int,
    known: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> ClassCentres | None:
    """Class centres of all finished shards of rounds < round_index, added in shard order.

    ``known`` maps shard index → (features, labels) a caller already holds (finished shards'
    outcomes); shards read from storage are added to it, so a long-lived caller reads each shard
    at most once. The result does not depend on where the features came from.
    """
    centres: ClassCentres | None = None
    for entry in manifest.shards:
        if entry.round >= round_index:
            continue
        if known is not None and entry.index in known:
            features, labels = known[entry.index]
        else:
            shard = read_shard(storage, entry.path)
            if shard.features is None:
                raise GenerationError(f"{storage.join(entry.path)} has no feature column; regenerate it")
            features, labels = shard.features, shard.labels
            if known is not None:
                known[entry.index] = (features, labels)
        if centres is None:
            centres = ClassCentres(num_classes, features.shape[1])
        centres.update(features, labels)
    return centres


class GenerationStats:
    """Aggregated timing and losses of a generation stage (for metrics.json)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.image_iterations = 0
        self.shards_done = 0
        self.final: dict[int, dict[str, float]] = {}
        self.history: dict[int, dict[str, list[float]]] = {}

    def add(self, outcome: ShardOutcome) -> None:
        self.seconds += outcome.seconds
        self.image_iterations += outcome.image_iterations
        self.shards_done += 1
        self.final[outcome.info.index] = outcome.final
        self.history[outcome.info.index] = outcome.history

    def merge(self, other: GenerationStats) -> None:
        """Add the shards of another stats object (e.g. a repair pass after the main one)."""
        self.seconds += other.seconds
        self.image_iterations += other.image_iterations
        self.shards_done += other.shards_done
        self.final.update(other.final)
        self.history.update(other.history)

    def summary(self) -> dict[str, Any]:
        mean_final: dict[str, float] = {}
        if self.final:
            keys = sorted({k for f in self.final.values() for k in f})
            for k in keys:
                vals = [f[k] for f in self.final.values() if k in f]
                mean_final[k] = float(np.mean(vals))
        return {
            "shards_generated": self.shards_done,
            "image_iterations": self.image_iterations,
            "image_iterations_per_s": self.image_iterations / self.seconds if self.seconds > 0 else None,
            "final_losses_mean": mean_final,
        }


def generate_local(
    ctx: RunContext, *, progress: bool = True, on_round: Callable[[Manifest], None] | None = None
) -> tuple[Manifest, GenerationStats]:
    """Generate the dataset in this process (no Ray), resuming from the manifest.

    ``on_round(manifest)`` runs after each round that generated shards (Tune trials report from it).
    """
    from tqdm.auto import tqdm

    storage = ctx.dataset_storage
    tasks, manifest, todo = pending_work(ctx, storage)
    stats = GenerationStats()
    if not todo:
        return manifest, stats
    g = ctx.cfg.generate
    if g.uses_generator:
        train_generator(ctx, storage, progress=progress)
    synth = make_synthesizer(ctx, storage)
    iters = g.iterations if g.optimizes and not g.uses_generator else 1
    bar = tqdm(total=len(todo) * iters, desc="generate", unit="it", disable=not progress)
    done_shards = len(tasks) - len(todo)
    try:
        for round_tasks in rounds(tasks):
            pending = [t for t in round_tasks if manifest.shard(t.index) is None]
            if not pending:
                continue
            centres = centres_before_round(storage, manifest, round_tasks[0].round, ctx.num_classes)
            state = centres.state() if centres is not None else None
            for pack in packs(pending, g.groups_per_pass):
                label = f"{done_shards + 1}/{len(tasks)}"
                if len(pack) > 1:
                    label = f"{done_shards + 1}-{done_shards + len(pack)}/{len(tasks)}"
                bar.set_postfix(shard=label)

                def tick(it: int, total: int, losses: dict[str, float], label: str = label, k: int = len(pack)) -> None:
                    bar.update(k)
                    if it % 20 == 0 or it == total:
                        bar.set_postfix(shard=label, loss=f"{losses['total']:.4f}")

                stepwise = g.optimizes and not g.uses_generator
                outcomes = synthesize_shards(synth, ctx, storage, pack, state, progress=tick if stepwise else None)
                for task, outcome in zip(pack, outcomes, strict=True):
                    kill_point("generate", task.index)  # test hook: shard file written, not yet listed
                    if not stepwise:
                        bar.update(1)
                    manifest.add_shard(outcome.info, round=task.round)
                    manifest.save(storage)
                    stats.add(outcome)
                    done_shards += 1
            if on_round is not None:
                on_round(manifest)
    finally:
        bar.close()
        synth.close()
    return manifest, stats
