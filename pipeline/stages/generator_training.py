"""Generator training of the ``gdfq`` / ``qimera`` methods: once per dataset, checkpointed, resumable.

Before their shards are sampled, these methods train a conditional generator against the frozen
teacher (:class:`intraq_core.synth.generator.GeneratorTrainer`). The training state lives next to
the shards, in the dataset's storage::

    data/generator/state.pt    generator + Adam state, RNG state, iteration, loss history

written atomically every ``generate.generator_checkpoint_every`` iterations and at the end
(tensors and plain types only: read weights-only by :func:`intraq_core.torchfile.load_resume_state`).
A run that is killed resumes from the last checkpoint and ends with the same generator as an uninterrupted one
(the RNG state is part of the checkpoint); a finished state is reused as is, so shards
regenerated later (``--resume``, ``--repair``) are identical. The checkpoint records the dataset
hash; a checkpoint of another config is an error, an unreadable one is retrained from scratch
(deterministically, so with the same result).

Executors: ``local`` trains in this process; ``ray`` trains in one actor that runs
:func:`train_generator` and writes the checkpoints itself (:mod:`pipeline.ray.generator_training`).
Either way the generation actors then load the finished state.

Test hook: ``INTRAQ_TEST_KILL_AT=generator:<k>`` SIGKILLs the training process right after the
checkpoint of iteration k is written (forwarded to the Ray actor).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch

from intraq_core.seeding import derive_seed
from intraq_core.synth.generator import GENERATOR_FORMAT, GeneratorSampler, GeneratorTrainer
from intraq_core.torchfile import load_resume_state
from pipeline.context import RunContext, kill_point
from pipeline.storage.store import Storage

__all__ = [
    "GENERATOR_STATE",
    "PURPOSE_GENERATOR",
    "load_generator_state",
    "make_sampler",
    "train_generator",
]

log = logging.getLogger(__name__)

#: The generator's checkpoint, relative to the dataset storage (``<run>/data``).
GENERATOR_STATE = "generator/state.pt"
#: Seed purpose of the generator (initialization and training RNG).
PURPOSE_GENERATOR = 7


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
    state = load_resume_state(raw, GENERATOR_FORMAT, what=where, kind="generator checkpoint")
    if state is None:
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
    moves its ``tqdm_ray`` bar with it); ``progress`` shows a local tqdm bar instead.
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
