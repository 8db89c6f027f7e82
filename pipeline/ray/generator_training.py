"""Generator training of the ``gdfq`` / ``qimera`` methods on Ray: one actor that trains and checkpoints.

The actor (``intraq-generator-trainer``, the resources of a generation actor) runs
:func:`pipeline.stages.generator_training.train_generator` and writes the checkpoints itself; an actor that dies is
replaced and resumes from the last checkpoint, at most ``ray.max_failures`` times. With ``progress``
the actor keeps a ``ray.experimental.tqdm_ray`` bar of its iterations (and latest loss), drawn on the
driver's terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import torch
from ray.experimental import tqdm_ray

from pipeline.config import RunConfig
from pipeline.context import KILL_AT_ENV, RunContext
from pipeline.ray.teacher import received_teacher
from pipeline.stages.generator_training import load_generator_state, train_generator
from pipeline.storage.store import Storage

log = logging.getLogger(__name__)

__all__ = ["GeneratorTrainingActor", "train_generator_ray"]


ACTOR_NAME = "intraq-generator-trainer"


class GeneratorTrainingActor:
    """Trains the run's generator in a Ray actor, checkpointing to the dataset storage."""

    def __init__(self, cfg: RunConfig, cpus: float, progress: bool = False, teacher: Any = None) -> None:
        """``teacher``: the driver's (:func:`pipeline.ray.teacher.share_teacher`), else it is built here;
        ``progress``: keep a bar of the training on the driver's terminal."""
        torch.set_num_threads(max(1, int(cpus)))
        self.ctx = RunContext.create(cfg, received_teacher(teacher))
        self.storage = self.ctx.dataset_storage
        self.progress = progress

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this
        return ACTOR_NAME

    def run(self) -> int:
        """Train to the end; returns the final iteration."""
        if not self.progress:
            return int(train_generator(self.ctx, self.storage)["iteration"])
        total = self.ctx.cfg.generate.generator_iterations
        bar = tqdm_ray.tqdm(desc="train generator", total=total, unit="it", flush_interval_s=0)

        def report(it: int, total: int, loss: float) -> None:
            bar.n = it
            bar.set_description(f"train generator loss {loss:.4f}")  # sends the state

        try:
            return int(train_generator(self.ctx, self.storage, report=report)["iteration"])
        finally:
            bar.close()


def train_generator_ray(
    ctx: RunContext, storage: Storage, actor_cfg: RunConfig, *, progress: bool = True, teacher: Any = None
) -> None:
    """Train the generator in an actor (replaced on death, resuming from its checkpoint).

    ``actor_cfg`` is the run config as actors need it (absolute storage paths); ``teacher`` the
    object reference of the driver's teacher (:func:`pipeline.ray.teacher.share_teacher`), or None.
    Skips everything when the finished checkpoint is already there. Runs inside the caller's Ray session.
    """
    import ray
    from ray.exceptions import RayActorError

    from pipeline.errors import GenerationError
    from pipeline.ray.resources import pool_spec

    state = load_generator_state(ctx, storage)
    if state is not None and state.get("done"):
        return
    spec = pool_spec(ctx.cfg, 1, ray.cluster_resources())
    options: dict[str, Any] = {
        "name": ACTOR_NAME,
        "num_cpus": spec.num_cpus,
        "num_gpus": spec.num_gpus,
        "max_restarts": 0,
        "max_task_retries": 0,
    }
    if os.environ.get(KILL_AT_ENV):
        options["runtime_env"] = {"env_vars": {KILL_AT_ENV: os.environ[KILL_AT_ENV]}}
    remote = ray.remote(GeneratorTrainingActor)
    failures = 0
    while True:
        actor = _start(remote, options, actor_cfg, spec.num_cpus, progress, teacher)
        try:
            ray.get(actor.run.remote())
            return
        except RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                raise GenerationError(
                    f"the generator training actor could not start: {lines[-1] if lines else type(exc).__name__}"
                ) from exc
            failures += 1
            if failures > ctx.cfg.ray.max_failures:
                raise GenerationError(
                    f"the generator training actor died {failures} times (ray.max_failures="
                    f"{ctx.cfg.ray.max_failures}); last error: {' '.join(str(exc).split())[:300]}"
                ) from exc
            log.warning("generator training actor died; resuming from its last checkpoint on a fresh actor")
        finally:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def _start(remote: Any, options: dict[str, Any], cfg: RunConfig, cpus: float, progress: bool, teacher: Any) -> Any:
    deadline = time.monotonic() + 10.0
    while True:
        try:
            return remote.options(**options).remote(cfg, cpus, progress, teacher)
        except ValueError:  # the name of an actor killed a moment ago is not released yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
