"""Generator training of the ``gdfq`` / ``qimera`` methods on Ray: one actor that trains and checkpoints.

The actor (``intraq-generator-trainer``, the resources of a generation actor) runs
:func:`pipeline.stages.generator_training.train_generator` and writes the checkpoints itself; an actor that dies is
replaced and resumes from the last checkpoint, at most ``ray.max_failures`` times.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.context import KILL_AT_ENV, RunContext, dataset_storage
from pipeline.ray.teacher import received_teacher
from pipeline.stages.generator_training import load_generator_state, train_generator
from pipeline.storage.store import Storage

log = logging.getLogger(__name__)

__all__ = ["GeneratorTrainingActor", "train_generator_ray"]


ACTOR_NAME = "intraq-generator-trainer"


POLL_S = 0.5


class GeneratorTrainingActor:
    """Trains the run's generator in a Ray actor, checkpointing to the dataset storage."""

    def __init__(self, cfg: RunConfig, cpus: float, board: Any = None, teacher: Any = None) -> None:
        """``teacher``: the driver's (:func:`pipeline.ray.teacher.share_teacher`), else it is built here."""
        torch.set_num_threads(max(1, int(cpus)))
        self.ctx = RunContext.create(cfg, received_teacher(teacher))
        self.storage = dataset_storage(self.ctx)
        self.board = board

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this
        return ACTOR_NAME

    def run(self) -> int:
        """Train to the end; returns the final iteration."""

        def report(it: int, total: int, loss: float) -> None:
            if self.board is not None:
                self.board.report.remote(-1, it, total, loss)

        state = train_generator(self.ctx, self.storage, report=report)
        return int(state["iteration"])


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
    from tqdm.auto import tqdm

    from pipeline.errors import GenerationError
    from pipeline.ray import metrics
    from pipeline.ray.resources import pool_spec

    state = load_generator_state(ctx, storage)
    if state is not None and state.get("done"):
        return
    spec = pool_spec(ctx.cfg, 1, ray.cluster_resources())
    board = metrics.progress_board_actor() if progress else None
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
    total = ctx.cfg.generate.generator_iterations
    bar = tqdm(total=total, desc="train generator", unit="it", disable=not progress)
    failures = 0
    try:
        while True:
            actor = _start(remote, options, actor_cfg, spec.num_cpus, board, teacher)
            ref = actor.run.remote()
            try:
                while True:
                    ready, _ = ray.wait([ref], timeout=POLL_S)
                    if board is not None:
                        with contextlib.suppress(Exception):
                            it, _, loss = ray.get(board.snapshot.remote(), timeout=5).get(-1, (bar.n, total, None))
                            bar.n = it
                            if loss is not None:
                                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                            bar.refresh()
                    if ready:
                        bar.n = ray.get(ref)
                        bar.refresh()
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
    finally:
        bar.close()
        if board is not None:
            with contextlib.suppress(Exception):
                ray.kill(board)


def _start(remote: Any, options: dict[str, Any], cfg: RunConfig, cpus: float, board: Any, teacher: Any) -> Any:
    deadline = time.monotonic() + 10.0
    while True:
        try:
            return remote.options(**options).remote(cfg, cpus, board, teacher)
        except ValueError:  # the name of an actor killed a moment ago is not released yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
