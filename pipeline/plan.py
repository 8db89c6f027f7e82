"""Label plan → shard tasks: the unit of generation work, fixed before any work starts.

A shard holds one optimization batch. Its labels, per-image seeds and batch seed are
fixed by the plan, so a shard is reproducible wherever and whenever it runs. Shards are
grouped into rounds of ``generate.shards_per_round``: every shard of round r sees the MDC
class centres of all images of rounds < r, so the dataset does not depend on how many
actors ran it.
"""

from __future__ import annotations

from dataclasses import dataclass

from intraq_core.seeding import PURPOSE_IMAGE, PURPOSE_SHARD, derive_seed
from intraq_core.synth.labels import label_plan
from pipeline.config import RunConfig


@dataclass(frozen=True)
class ShardTask:
    """One batch of the plan: which images, labels and seeds it optimizes."""

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


def make_plan(cfg: RunConfig, num_classes: int) -> list[ShardTask]:
    """Cut the run's label plan into shard tasks (deterministic in the config and seed)."""
    g = cfg.generate
    labels = label_plan(g.num_images, num_classes, g.label_plan, cfg.seed).tolist()
    size = min(g.batch_size, g.num_images)
    tasks = []
    for index, start in enumerate(range(0, g.num_images, size)):
        stop = min(start + size, g.num_images)
        tasks.append(
            ShardTask(
                index=index,
                round=index // g.shards_per_round,
                start=start,
                labels=tuple(labels[start:stop]),
                image_seeds=tuple(derive_seed(cfg.seed, PURPOSE_IMAGE, i) for i in range(start, stop)),
                batch_seed=derive_seed(cfg.seed, PURPOSE_SHARD, index),
            )
        )
    return tasks


def rounds(tasks: list[ShardTask]) -> list[list[ShardTask]]:
    """Tasks grouped by round, in order."""
    out: dict[int, list[ShardTask]] = {}
    for t in tasks:
        out.setdefault(t.round, []).append(t)
    return [out[r] for r in sorted(out)]
