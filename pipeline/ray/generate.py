"""The Ray generation executor: a pool of generator actors, one shard per call, round by round.

Same semantics and output as :func:`pipeline.stages.generate.generate_local` (identical shard pixels,
labels and features for the same config and seed, whatever the number of actors):

* The plan is cut into rounds of ``generate.shards_per_round`` shards. When a round starts,
  the driver computes the MDC class-centre snapshot from the features of the finished shards
  of earlier rounds, in shard order (:func:`pipeline.stages.generate.centres_before_round`), puts it
  once in the object store and hands the reference to every shard of the round.
* The shared centre store is the driver itself: it holds the only :class:`ClassCentres` and
  broadcasts round-synchronous snapshots through the object store. It keeps the features of
  finished shards (returned with each outcome; shards finished by an earlier, interrupted run
  are read once from storage) and sums them in shard order, exactly as the local executor
  does. A separate centre-store actor would add a process and RPCs without changing any
  result, since centres only change between rounds.
* Generator methods (``gdfq``, ``qimera``) first train their generator in one actor
  (:func:`pipeline.ray.generator_training.train_generator_ray`, checkpointed and resumed on actor death).
* Each :class:`GeneratorActor` (dashboard name ``intraq-generator-<i>``) receives the teacher the
  driver built (:mod:`pipeline.ray.teacher`, through the object store) and builds one
  :class:`~intraq_core.synth.engine.Synthesizer` (or the trained generator's sampler) on it once,
  optimizes the shards it is given (a pack of ``generate.groups_per_pass`` shards of a round per
  call, one pass for the pack), writes each one itself (atomic Parquet write,
  :func:`pipeline.stages.generate.write_shards`) and returns its
  :class:`~pipeline.stages.generate.ShardOutcome`. The driver keeps two packs of a round on each
  actor when it has them (:data:`PACKS_IN_FLIGHT`; every actor gets one before any gets two): the
  actor optimizes the next while it writes the last, so neither storage nor the round trip to the
  driver stalls its loop. The driver adds every finished shard to the manifest
  and saves it atomically at once, so a crash loses at most the in-flight shards, and
  a re-run skips listed shards.
* An actor that dies mid-shard (``RayActorError``: killed, OOM, node lost) is replaced by a
  fresh actor and its packs re-dispatched; the one it was optimizing counts a failure, at most
  ``ray.max_failures`` per shard. A
  shard is only listed after its file is complete, so no partial shard is ever visible.
* Pool size: ``ray.generation_actors``, else as many actors as the cluster fits (one per
  ``ray.gpus_per_actor`` GPUs on GPU clusters, else one per ``ray.cpus_per_actor`` CPUs), and
  never more than the shards of a round, spread over the nodes. CPU actors bound torch to
  their CPUs.
* Progress (``progress=True``): Ray's distributed tqdm (``ray.experimental.tqdm_ray``) draws every
  bar on the driver's terminal. Each actor keeps one bar of its own (``intraq-generator-<i>``:
  the shard·iterations of the packs it was given, the shards it is on and their latest loss),
  moved every ~10% of a pack's iterations; its state travels with the actor's output to the driver.
  The driver's own bar counts finished shards, with image·iterations/s and the latest final loss.
  It is a ``tqdm_ray`` bar too (drawn directly, no output in between), so that one manager places
  all of them on the terminal without two bars on one line. The actors also record Ray metrics
  (:mod:`pipeline.ray.metrics`).

Test hook: when ``INTRAQ_TEST_ACTOR_EXIT_ONCE`` names a file that does not exist, the first
actor to reach half of a shard's iterations creates it and exits abruptly (as if killed), so
tests can check recovery deterministically. The driver forwards the variable to its actors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError
from ray.experimental import tqdm_ray

from pipeline.config import RunConfig
from pipeline.context import RunContext
from pipeline.errors import GenerationError
from pipeline.ray import metrics
from pipeline.ray.generator_training import train_generator_ray
from pipeline.ray.resources import PoolSpec, pool_spec
from pipeline.ray.teacher import received_teacher, share_teacher
from pipeline.ray.user_code import with_user_code
from pipeline.stages.generate import (
    GenerationStats,
    ShardOutcome,
    centres_before_round,
    make_synthesizer,
    optimize_shards,
    pending_work,
    write_shards,
)
from pipeline.stages.plan import ShardTask, packs, rounds
from pipeline.storage.manifest import Manifest
from pipeline.storage.store import Storage

__all__ = ["FAULT_ENV", "GeneratorActor", "generate_ray"]

log = logging.getLogger(__name__)

FAULT_ENV = "INTRAQ_TEST_ACTOR_EXIT_ONCE"
ACTOR_NAME = "intraq-generator-{}"
POLL_S = 0.5
#: Packs the driver keeps on each actor at once: the next one optimizes while the last is written.
PACKS_IN_FLIGHT = 2
REPORT_FRACTION = 10  # actors move their bar every 1/REPORT_FRACTION of a shard's iterations
STALL_WARNING_S = 120.0
#: Seconds the pool waits for its actors to close their bars before it kills them.
CLOSE_TIMEOUT_S = 5.0


def _shards(pack: list[ShardTask]) -> str:
    """``shard 3`` or ``shards 3-4``: the shards of a pack, for messages and bars."""
    return f"shard {pack[0].index}" if len(pack) == 1 else f"shards {pack[0].index}-{pack[-1].index}"


class GeneratorActor:
    """One Synthesizer in one Ray actor; optimizes and writes the shards it is given.

    A threaded actor (:data:`PACKS_IN_FLIGHT` calls at once): the packs optimize one at a time
    (a lock), and a pack is written outside the lock, so storage never stalls the optimization of
    the next pack the driver has already sent. A call returns once its shards are written.
    """

    def __init__(self, cfg: RunConfig, name: str, cpus: float, progress: bool = False, teacher: Any = None) -> None:
        """``teacher``: the driver's (:func:`pipeline.ray.teacher.share_teacher`), else it is built here;
        ``progress``: keep a bar of this actor's iterations on the driver's terminal."""
        torch.set_num_threads(max(1, int(cpus)))
        self.name = name
        self.ctx = RunContext.create(cfg, received_teacher(teacher))
        self.storage = self.ctx.dataset_storage
        g = self.ctx.cfg.generate
        self.stepwise = g.optimizes and not g.uses_generator  # only the pixel optimizer reports its iterations
        self.bar = None
        if progress and self.stepwise:
            self.bar = tqdm_ray.tqdm(desc=name, total=0, unit="it", flush_interval_s=0)
        self.fault_marker = os.environ.get(FAULT_ENV) or None
        self.synth = make_synthesizer(self.ctx, self.storage)
        self.optimizing = threading.Lock()

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this
        return self.name

    def run(self, pack: list[ShardTask], centres_state: dict[str, Any] | None) -> list[ShardOutcome]:
        """Optimize and write the shards of ``pack`` (one pass) against the round's centre snapshot."""
        run_name = self.ctx.cfg.name
        g = self.ctx.cfg.generate
        step = max(1, g.iterations // REPORT_FRACTION)
        done = 0  # this actor's shard·iterations before this pack (its bar's position)

        def report(it: int, total: int, losses: dict[str, float]) -> None:
            if self.fault_marker is not None and it >= max(1, total // 2):
                self._maybe_fail()
            if it % step == 0 or it == total:
                loss = float(losses.get("total", float("nan")))
                metrics.GENERATION_LOSS.set(loss, run=run_name, term="total")
                if self.bar is not None:
                    self.bar.n = done + it * len(pack)
                    self.bar.set_description(f"{self.name} {_shards(pack)} loss {loss:.4f}")  # sends the state

        progress = report if self.stepwise else None
        with self.optimizing:
            if self.bar is not None:
                done = self.bar.total
                self.bar.total = done + g.iterations * len(pack)
            results = optimize_shards(self.synth, pack, centres_state, progress=progress)
        outcomes = write_shards(self.ctx, self.storage, pack, results)
        seconds = sum(o.seconds for o in outcomes)
        if seconds > 0:
            rate = sum(o.image_iterations for o in outcomes) / seconds
            metrics.GENERATION_IMAGE_ITERATIONS_PER_S.set(rate, run=run_name, actor=self.name)
        for outcome in outcomes:
            for term, value in outcome.final.items():
                metrics.GENERATION_LOSS.set(value, run=run_name, term=term)
        return outcomes

    def close_progress(self) -> None:
        """Close this actor's bar (the pool calls it before it kills the actor)."""
        if self.bar is not None:
            self.bar.close()

    def _maybe_fail(self) -> None:
        """Test hook: exit this process once (the first actor to claim the marker file)."""
        assert self.fault_marker is not None
        try:
            fd = os.open(self.fault_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            self.fault_marker = None
            return
        os.close(fd)
        os._exit(1)


_RemoteGenerator = ray.remote(GeneratorActor)


def _actor_config(ctx: RunContext) -> RunConfig:
    """The run config as actors need it: local storage paths made absolute (same dataset hash)."""
    cfg = ctx.cfg
    update: dict[str, Any] = {"storage": cfg.storage.model_copy(update={"url": ctx.storage.url})}
    if cfg.dataset is not None:
        other = Storage.from_config(cfg.storage.model_copy(update={"url": cfg.dataset}))
        update["dataset"] = other.url
    return cfg.model_copy(update=update)


class _Pool:
    """The generator actors of one generation: created on demand, replaced when they die."""

    def __init__(self, cfg: RunConfig, spec: PoolSpec, progress: bool, teacher: Any = None) -> None:
        self.cfg = cfg
        self.spec = spec
        self.progress = progress
        self.teacher = teacher  # the object reference of the driver's teacher, or None
        self.created = 0
        self.actors: list[Any] = []
        #: Packs in flight on each actor.
        self.load: dict[Any, int] = {}
        fault = os.environ.get(FAULT_ENV)
        # The user's model module (if any) travels with each actor too: a Ray started elsewhere lacks it.
        env = {"env_vars": {FAULT_ENV: fault}} if fault else None
        self.runtime_env = with_user_code(env, cfg.model, upload=True)

    def start(self) -> None:
        while len(self.actors) < self.spec.size:
            self._add()

    def _add(self) -> Any:
        name = ACTOR_NAME.format(self.created)
        self.created += 1
        options: dict[str, Any] = {
            "name": name,
            "num_cpus": self.spec.num_cpus,
            "num_gpus": self.spec.num_gpus,
            "max_restarts": 0,
            "max_task_retries": 0,
            "max_concurrency": PACKS_IN_FLIGHT,
            # One actor per node before two on one: actors are independent and compute-bound.
            "scheduling_strategy": "SPREAD",
        }
        if self.runtime_env is not None:
            options["runtime_env"] = self.runtime_env
        deadline = time.monotonic() + 10.0
        while True:
            try:
                actor = _RemoteGenerator.options(**options).remote(
                    self.cfg, name, self.spec.num_cpus, self.progress, self.teacher
                )
                break
            except ValueError:  # the name of an actor killed a moment ago is not released yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.actors.append(actor)
        self.load[actor] = 0
        return actor

    def next_actor(self) -> Any | None:
        """The actor with the fewest packs in flight (the first such), None when all have :data:`PACKS_IN_FLIGHT`.

        So every actor gets a pack before any gets a second one.
        """
        actor = min(self.actors, key=lambda a: self.load[a], default=None)
        return actor if actor is not None and self.load[actor] < PACKS_IN_FLIGHT else None

    def replace(self, dead: Any) -> None:
        """Drop a dead actor and start a fresh one in its place."""
        with contextlib.suppress(Exception):
            ray.kill(dead, no_restart=True)
        self.actors = [a for a in self.actors if a is not dead]
        self.load.pop(dead, None)
        self._add()

    def shutdown(self) -> None:
        if self.progress:  # their bars' last state goes out with their output before they are killed
            with contextlib.suppress(Exception):
                closing = [actor.close_progress.remote() for actor in self.actors]
                ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors.clear()
        self.load.clear()


def generate_ray(ctx: RunContext, *, progress: bool = True) -> tuple[Manifest, GenerationStats]:
    """Generate the dataset with a pool of Ray actors, resuming from the manifest.

    Uses the Ray this process is connected to: the caller enters the Ray session (the CLI does,
    once per command; see :mod:`pipeline.ray.session`).
    """
    return _generate(ctx, progress=progress)


def _generate(ctx: RunContext, *, progress: bool) -> tuple[Manifest, GenerationStats]:
    storage = ctx.dataset_storage
    if storage.kind == "memory":
        raise GenerationError(
            f"{storage.url}: memory:// storage is private to one process; the ray executor needs a "
            "location every actor can reach (a local path on one machine, or s3://)"
        )
    if not ray.is_initialized():
        raise GenerationError("the ray executor needs a running Ray (pipeline.ray.session.start_ray)")
    tasks, manifest, todo = pending_work(ctx, storage)
    stats = GenerationStats()
    if not todo:
        return manifest, stats

    plan_rounds = rounds(tasks)
    per_pass = ctx.cfg.generate.groups_per_pass
    busiest = max(len(packs([t for t in r if manifest.shard(t.index) is None], per_pass)) for r in plan_rounds)
    resources = ray.cluster_resources()
    spec = pool_spec(ctx.cfg, busiest, resources)
    if storage.kind == "local" and len(ray.nodes()) > 1:
        log.warning(
            "storage %s is a local path but Ray has %d nodes: actors on other nodes write to their "
            "own disks; use s3:// storage on a cluster",
            storage.url,
            len(ray.nodes()),
        )
    teacher = share_teacher(ctx)
    if ctx.cfg.generate.uses_generator:  # gdfq / qimera: train the generator first, in an actor
        train_generator_ray(ctx, storage, _actor_config(ctx), progress=progress, teacher=teacher)
    pool = _Pool(_actor_config(ctx), spec, progress, teacher)
    bar = None
    if progress:
        bar = tqdm_ray.tqdm(total=len(todo), desc="generate", unit="shard", flush_interval_s=0)
        bar.refresh()  # shown from the start, not from the first finished shard
    driver = _Driver(ctx, storage, manifest, stats, pool, bar)
    log.info(
        "generating %d shards with %d actors (%s CPU, %s GPU each)",
        len(todo),
        spec.size,
        spec.num_cpus,
        spec.num_gpus,
    )
    try:
        pool.start()
        for round_tasks in plan_rounds:
            pending = [t for t in round_tasks if manifest.shard(t.index) is None]
            if not pending:
                continue
            centres = centres_before_round(
                storage, manifest, round_tasks[0].round, ctx.num_classes, known=driver.features
            )
            state_ref = ray.put(centres.state() if centres is not None else None)
            driver.run_round(pending, state_ref)
    finally:
        if bar is not None:
            bar.close()
        pool.shutdown()
    return manifest, stats


class _Driver:
    """Dispatches one round's packs to the actors and records each finished shard at once."""

    def __init__(
        self,
        ctx: RunContext,
        storage: Storage,
        manifest: Manifest,
        stats: GenerationStats,
        pool: _Pool,
        bar: Any,
    ) -> None:
        self.ctx = ctx
        self.storage = storage
        self.manifest = manifest
        self.stats = stats
        self.pool = pool
        self.bar = bar
        self.failures: dict[int, int] = {}
        # The centre store's input: features and labels of every finished shard, by index.
        self.features: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.started = time.perf_counter()

    def run_round(self, pending: list[ShardTask], state_ref: Any) -> None:
        """Run one round's packs, up to :data:`PACKS_IN_FLIGHT` on each actor at once."""
        queue = deque(packs(pending, self.ctx.cfg.generate.groups_per_pass))
        inflight: dict[Any, tuple[Any, list[ShardTask]]] = {}  # in the order of dispatch
        last_finish = time.monotonic()
        warned = False
        while queue or inflight:
            while queue and (actor := self.pool.next_actor()) is not None:
                pack = queue.popleft()
                inflight[actor.run.remote(pack, state_ref)] = (actor, pack)
                self.pool.load[actor] += 1
            if not inflight:  # unreachable while the pool has actors; never spin silently
                raise GenerationError("no generator actor available to run the remaining shards")
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref not in inflight:  # a pack of an actor that died, already re-queued
                    continue
                actor, pack = inflight[ref]
                try:
                    outcomes: list[ShardOutcome] = ray.get(ref)
                except RayActorError as exc:
                    # All its packs died with it. The first sent is the one it was optimizing (they
                    # optimize in order): it counts the failure. All go back to the queue, in order.
                    lost = [inflight.pop(r)[1] for r in [r for r, (a, _) in inflight.items() if a == actor]]
                    self._actor_died(actor, lost[0], exc)
                    queue.extendleft(reversed(lost))
                    continue
                del inflight[ref]
                self.pool.load[actor] -= 1
                for task, outcome in zip(pack, outcomes, strict=True):
                    self._record(task, outcome)
                last_finish = time.monotonic()
            if not warned and time.monotonic() - last_finish > STALL_WARNING_S:
                warned = True
                log.warning(
                    "no shard finished for %.0f s: does the cluster have %s CPU / %s GPU free per actor? (ray status)",
                    STALL_WARNING_S,
                    self.pool.spec.num_cpus,
                    self.pool.spec.num_gpus,
                )

    def _actor_died(self, actor: Any, pack: list[ShardTask], exc: BaseException) -> None:
        if getattr(exc, "actor_init_failed", False):  # its __init__ raised: retrying cannot help
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise GenerationError(
                f"a generator actor could not start: {lines[-1] if lines else type(exc).__name__}"
            ) from exc
        task = pack[0]  # a pack is retried whole; its first shard counts the failures
        n = self.failures.get(task.index, 0) + 1
        self.failures[task.index] = n
        reason = " ".join(str(exc).split())[:300]
        shards = _shards(pack)
        if n > self.ctx.cfg.ray.max_failures:
            raise GenerationError(
                f"{shards}: its generator actor died {n} times (ray.max_failures="
                f"{self.ctx.cfg.ray.max_failures}); last error: {reason}"
            ) from exc
        log.warning("%s: generator actor died (%s); retrying on a fresh actor", shards, reason)
        self.pool.replace(actor)

    def _record(self, task: ShardTask, outcome: ShardOutcome) -> None:
        self.manifest.add_shard(outcome.info, round=task.round)
        self.manifest.save(self.storage)
        self.stats.add(outcome)
        self.features[task.index] = (outcome.features, outcome.labels)
        metrics.SHARDS_DONE.inc(run=self.ctx.cfg.name)
        if self.bar is not None:
            rate = self.stats.image_iterations / max(time.perf_counter() - self.started, 1e-9)
            loss = f" loss {outcome.final['total']:.4f}" if "total" in outcome.final else ""
            self.bar.update(1)
            self.bar.set_description(f"generate {rate:.0f} img·it/s{loss}")
