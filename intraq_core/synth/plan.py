"""Label plan → batch tasks: the unit of synthesis work, fixed before any work starts.

A task is one optimization batch. Its labels, per-image seeds and batch seed are fixed by the
plan, so a batch is reproducible wherever and whenever it runs. Tasks are grouped into rounds
of ``batches_per_round``: every batch of round r sees the MDC class centres of all images of
rounds < r, so the images do not depend on how many processes ran them. The pipeline stores
one task per Parquet shard (:mod:`pipeline.stages.plan`); :func:`intraq_core.api.synthesize` runs the
same plan in memory, so both give the same images for the same settings and seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from intraq_core.seeding import PURPOSE_IMAGE, PURPOSE_SHARD, derive_seed
from intraq_core.synth.labels import label_plan

__all__ = ["ShardTask", "packs", "plan_tasks", "rounds"]


@dataclass(frozen=True)
class ShardTask:
    """One batch of the plan (one shard of the pipeline's dataset): which images, labels and seeds."""

    index: int
    round: int
    start: int
    labels: tuple[int, ...]
    image_seeds: tuple[int, ...]
    batch_seed: int

    @property
    def size(self) -> int:
        return len(self.labels)

    @property
    def indices(self) -> range:
        return range(self.start, self.start + self.size)


def plan_tasks(
    num_images: int,
    num_classes: int,
    *,
    batch_size: int,
    batches_per_round: int,
    label_mode: str = "balanced",
    seed: int = 0,
) -> list[ShardTask]:
    """Cut the label plan of ``num_images`` images into batch tasks (deterministic in the arguments)."""
    labels = label_plan(num_images, num_classes, label_mode, seed).tolist()  # type: ignore[arg-type]
    size = min(batch_size, num_images)
    tasks = []
    for index, start in enumerate(range(0, num_images, size)):
        stop = min(start + size, num_images)
        tasks.append(
            ShardTask(
                index=index,
                round=index // batches_per_round,
                start=start,
                labels=tuple(labels[start:stop]),
                image_seeds=tuple(derive_seed(seed, PURPOSE_IMAGE, i) for i in range(start, stop)),
                batch_seed=derive_seed(seed, PURPOSE_SHARD, index),
            )
        )
    return tasks


def rounds(tasks: list[ShardTask]) -> list[list[ShardTask]]:
    """Tasks grouped by round, in order."""
    out: dict[int, list[ShardTask]] = {}
    for t in tasks:
        out.setdefault(t.round, []).append(t)
    return [out[r] for r in sorted(out)]


def packs(tasks: list[ShardTask], groups_per_pass: int) -> list[list[ShardTask]]:
    """Tasks (in order) cut into packs optimized in one pass (``generate.groups_per_pass``).

    A pack holds at most ``groups_per_pass`` consecutive tasks of one round (they see the same
    MDC centres) and one size (the last batch of a plan may be smaller; it gets its own pack).
    """
    out: list[list[ShardTask]] = []
    for t in tasks:
        last = out[-1] if out else None
        if last is not None and len(last) < groups_per_pass and last[0].round == t.round and last[0].size == t.size:
            last.append(t)
        else:
            out.append([t])
    return out
