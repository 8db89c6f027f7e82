"""Generator training of the ``gdfq`` / ``qimera`` methods: once per dataset, checkpointed, resumable.

Before their shards are sampled, these methods train a conditional generator against the frozen
teacher (:class:`intraq_core.synth.generator.GeneratorTrainer`). The training state lives next to
the shards, in the dataset's storage::

    data/generator/state.pt    generator + Adam state, RNG state, iteration, loss history

written atomically every ``generate.generator_checkpoint_every`` iterations and at the end
(tensors and plain types only: loaded with ``torch.load(weights_only=True)``). A run that is
killed resumes from the last checkpoint and ends with the same generator as an uninterrupted one
(the RNG state is part of the checkpoint); a finished state is reused as is, so shards
regenerated later (``--resume``, ``--repair``) are identical. The checkpoint records the dataset
hash; a checkpoint of another config is an error, an unreadable one is retrained from scratch
(deterministically, so with the same result).

Executors: ``local`` trains in this process; ``ray`` trains in one actor
(``intraq-generator-trainer``, the resources of a generation actor) that writes the checkpoints
itself; an actor that dies is replaced and resumes from the last checkpoint, at most
``ray.max_failures`` times. Either way the generation actors then load the finished state.

Test hook: ``INTRAQ_TEST_KILL_AT=generator:<k>`` SIGKILLs the training process right after the
checkpoint of iteration k is written (forwarded to the Ray actor).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from typing import Any

import torch

from intraq_core.seeding import derive_seed
from intraq_core.synth.generator import GENERATOR_FORMAT, GeneratorSampler, GeneratorTrainer
from pipeline.config import RunConfig
from pipeline.context import KILL_AT_ENV, RunContext, kill_point
from pipeline.storage.store import Storage

__all__ = [
    "GENERATOR_STATE",
    "PURPOSE_GENERATOR",
    "load_generator_state",
    "make_sampler",
    "train_generator",
    "train_generator_ray",
]

log = logging.getLogger(__name__)

#: The generator's checkpoint, relative to the dataset storage (``<run>/data``).
GENERATOR_STATE = "generator/state.pt"
#: Seed purpose of the generator (initialization and training RNG).
PURPOSE_GENERATOR = 7
ACTOR_NAME = "intraq-generator-trainer"
POLL_S = 0.5


class GeneratorStateError(RuntimeError):
    """The dataset location holds a generator of another config."""


def load_generator_state(ctx: RunContext, storage: Storage) -> dict[str, Any] | None:
    """The generator checkpoint of this dataset, or None (absent, or unreadable: retrained).

    A readable checkpoint of another dataset config is an error (like a foreign manifest).
    """
    try:
        raw = storage.read_bytes(GENERATOR_STATE)
    except FileNotFoundError:
        return None
    where = storage.join(GENERATOR_STATE)
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        log.warning("ignoring unreadable generator checkpoint %s (%s): training again", where, str(exc)[:200])
        return None
    if not isinstance(state, dict) or state.get("format") != GENERATOR_FORMAT:
        log.warning("ignoring %s: not a generator checkpoint; training again", where)
        return None
    if state.get("config_hash") != ctx.cfg.dataset_hash():
        raise GeneratorStateError(
            f"{where} is the generator of another config (hash {state.get('config_hash')}, this run "
            f"{ctx.cfg.dataset_hash()}); use another storage location or --overwrite"
        )
    return state


def train_generator(ctx: RunContext, storage: Storage, *, progress: bool = False, report: Any = None) -> dict[str, Any]:
    """Train (or finish training) the run's generator; returns the finished checkpoint.

    ``report(iteration, total, loss)`` is called every ~2% of the iterations (the Ray actor
    forwards it to the driver's progress bar); ``progress`` shows a local tqdm bar instead.
    """
    from tqdm.auto import tqdm

    cfg = ctx.cfg
    g = cfg.generate
    state = load_generator_state(ctx, storage)
    if state is not None and state.get("done"):
        return state
    trainer = GeneratorTrainer(
        ctx.teacher(),
        g,
        num_classes=ctx.num_classes,
        image_shape=ctx.image_shape,
        seed=derive_seed(cfg.seed, PURPOSE_GENERATOR),
        device=ctx.device,
    )
    if state is not None:
        trainer.load_state_dict(state)
        log.info("resuming generator training at iteration %d of %d", trainer.iteration, g.generator_iterations)
    identity = cfg.dataset_hash()
    final: dict[str, Any] = {}

    def checkpoint(t: GeneratorTrainer) -> None:
        payload = {**t.state_dict(), "config_hash": identity}
        buf = io.BytesIO()
        torch.save(payload, buf)
        storage.write_bytes_atomic(GENERATOR_STATE, buf.getvalue())
        final.update(payload)
        kill_point("generator", t.iteration)  # test hook: checkpoint written

    bar = tqdm(
        total=g.generator_iterations,
        initial=trainer.iteration,
        desc="train generator",
        unit="it",
        disable=not progress,
    )
    every = max(1, g.generator_iterations // 50)

    def tick(it: int, total: int, losses: dict[str, float]) -> None:
        bar.update(1)
        if it % every == 0 or it == total:
            bar.set_postfix(loss=f"{losses['total']:.4f}", ce=f"{losses['ce']:.3f}")
            if report is not None:
                report(it, total, losses["total"])

    try:
        trainer.train(checkpoint_every=g.generator_checkpoint_every, on_checkpoint=checkpoint, progress=tick)
    finally:
        bar.close()
        trainer.close()
    if not final:  # already at the budget but not marked done (cannot happen with this writer)
        checkpoint(trainer)
    log.info(
        "generator trained: %d iterations, final CE %.4f, BNS %.4f",
        trainer.iteration,
        trainer.history["ce"][-1],
        trainer.history["bns_mean"][-1] + trainer.history["bns_var"][-1],
    )
    return final


def make_sampler(ctx: RunContext, storage: Storage) -> GeneratorSampler:
    """The shard sampler of a trained generator (an error if it is not trained yet)."""
    state = load_generator_state(ctx, storage)
    if state is None or not state.get("done"):
        raise GeneratorStateError(f"{storage.join(GENERATOR_STATE)}: the generator has not finished training")
    return GeneratorSampler(
        ctx.teacher(),
        ctx.cfg.generate,
        state,
        image_shape=ctx.image_shape,
        num_classes=ctx.num_classes,
        device=ctx.device,
    )


# -- Ray ------------------------------------------------------------------------------------------


class GeneratorTrainingActor:
    """Trains the run's generator in a Ray actor, checkpointing to the dataset storage."""

    def __init__(self, cfg: RunConfig, cpus: float, board: Any = None) -> None:
        from pipeline.stages.generate import dataset_storage

        torch.set_num_threads(max(1, int(cpus)))
        self.ctx = RunContext.create(cfg)
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


def train_generator_ray(ctx: RunContext, storage: Storage, actor_cfg: RunConfig, *, progress: bool = True) -> None:
    """Train the generator in an actor (replaced on death, resuming from its checkpoint).

    ``actor_cfg`` is the run config as actors need it (absolute storage paths). Skips everything
    when the finished checkpoint is already there. Runs inside the caller's Ray session.
    """
    import ray
    from ray.exceptions import RayActorError
    from tqdm.auto import tqdm

    from pipeline.ray import metrics
    from pipeline.ray.generate import pool_spec
    from pipeline.stages.generate import GenerationError

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
            actor = _start(remote, options, actor_cfg, spec.num_cpus, board)
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


def _start(remote: Any, options: dict[str, Any], cfg: RunConfig, cpus: float, board: Any) -> Any:
    deadline = time.monotonic() + 10.0
    while True:
        try:
            return remote.options(**options).remote(cfg, cpus, board)
        except ValueError:  # the name of an actor killed a moment ago is not released yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
