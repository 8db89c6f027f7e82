"""The executor of a run, chosen once from ``executor`` in the config: local or Ray.

Both run the same code of each stage (:mod:`pipeline.stages.generate`, :mod:`pipeline.stages.train` and the
training loop of :mod:`intraq_core.distill`); they differ only in where it runs:

* :class:`LocalExecutor`: everything in this process (a laptop, a test, a Tune trial);
* :class:`RayExecutor`: generation actors (:mod:`pipeline.ray.generate`) and Ray Train workers
  (:mod:`pipeline.ray.train`) on the Ray this process is connected to. Entering the Ray session
  is the caller's job (the CLI does it once per command, :mod:`pipeline.ray.session`); a stage
  never starts or stops Ray.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from pipeline.config import RunConfig

if TYPE_CHECKING:
    from pipeline.context import RunContext
    from pipeline.stages.generate import GenerationStats
    from pipeline.stages.train import TrainOutcome
    from pipeline.storage.manifest import Manifest

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "executor_for"]


class Executor(ABC):
    """Runs the generation and training stages of a run somewhere."""

    name = "?"
    #: Whether the stages need a connected Ray (the CLI enters a Ray session first when so).
    needs_ray = False

    @abstractmethod
    def generate(self, ctx: RunContext, *, progress: bool = True) -> tuple[Manifest, GenerationStats]:
        """Generate (or finish) the run's synthetic dataset; its manifest and the work done."""

    @abstractmethod
    def train(self, ctx: RunContext, manifest: Manifest, *, progress: bool = True) -> TrainOutcome:
        """Calibrate and distil on the dataset of ``manifest``; write the students."""


class LocalExecutor(Executor):
    """Every stage in this process."""

    name = "local"

    def generate(self, ctx: RunContext, *, progress: bool = True) -> tuple[Manifest, GenerationStats]:
        from pipeline.stages.generate import generate_local

        return generate_local(ctx, progress=progress)

    def train(self, ctx: RunContext, manifest: Manifest, *, progress: bool = True) -> TrainOutcome:
        from pipeline.stages.train import train_local

        return train_local(ctx, manifest, progress=progress)


class RayExecutor(Executor):
    """Generation actors and Ray Train workers on the connected Ray."""

    name = "ray"
    needs_ray = True

    def generate(self, ctx: RunContext, *, progress: bool = True) -> tuple[Manifest, GenerationStats]:
        from pipeline.ray.generate import generate_ray

        return generate_ray(ctx, progress=progress)

    def train(self, ctx: RunContext, manifest: Manifest, *, progress: bool = True) -> TrainOutcome:
        """Ray Train workers; without distillation (``distill.epochs: 0``) there is nothing to
        distribute, so calibration or reconstruction runs in this process."""
        if ctx.cfg.distill.epochs == 0:
            from pipeline.stages.train import train_local

            return train_local(ctx, manifest, progress=progress)
        from pipeline.ray.train import train_ray

        return train_ray(ctx, manifest, progress=progress)


def executor_for(cfg: RunConfig) -> Executor:
    """The executor ``cfg.executor`` names."""
    return RayExecutor() if cfg.executor == "ray" else LocalExecutor()
