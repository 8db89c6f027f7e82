"""Label plan → shard tasks of a run: one task of :mod:`intraq_core.synth.plan` per Parquet shard.

The plan itself (labels, per-image seeds, batch seeds, rounds of MDC centres) lives in the core,
so the Python API's in-memory :func:`intraq_core.api.synthesize` and the pipeline's executors
optimize exactly the same batches.
"""

from __future__ import annotations

from intraq_core.synth.plan import ShardTask, packs, plan_tasks, rounds
from pipeline.config import RunConfig

__all__ = ["ShardTask", "make_plan", "packs", "rounds"]


def make_plan(cfg: RunConfig, num_classes: int) -> list[ShardTask]:
    """Cut the run's label plan into shard tasks (deterministic in the config and seed)."""
    g = cfg.generate
    return plan_tasks(
        g.num_images,
        num_classes,
        batch_size=g.batch_size,
        batches_per_round=g.shards_per_round,
        label_mode=g.label_plan,
        seed=cfg.seed,
    )
