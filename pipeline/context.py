"""What every stage needs from a run config: the resolved model, the device, the storage."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import signal
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn as nn

from intraq_core.config import ModelConfig
from intraq_core.memory import reuse_freed_memory
from intraq_core.models import create_model, resolve_model_config
from pipeline.config import RunConfig
from pipeline.storage.store import Storage

log = logging.getLogger(__name__)

#: Test hook: ``"<stage>:<n>"`` makes this process SIGKILL itself at that point of a run, to test
#: recovery from a killed process deterministically: ``generate:<k>`` right after shard k's file
#: is written and before the manifest lists it (local executor); ``train:<e>`` at the start of
#: epoch e, after epoch e-1's checkpoint is written (local executor).
KILL_AT_ENV = "INTRAQ_TEST_KILL_AT"


def kill_point(stage: str, index: int) -> None:
    """SIGKILL this process if :data:`KILL_AT_ENV` names this point (a test hook; a no-op otherwise)."""
    spec = os.environ.get(KILL_AT_ENV)
    if spec and spec == f"{stage}:{index}":
        os.kill(os.getpid(), signal.SIGKILL)


def resolve_device(choice: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available (use device: auto or cpu)")
    return torch.device(choice)


def limit_threads(default: int | None = None) -> None:
    """Bound torch's intra-op threads (Ray sets OMP_NUM_THREADS to the actor's CPUs)."""
    n = default if default is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


def state_dict_sha256(model: nn.Module) -> str:
    """A checksum of a model's weights (stable across processes and devices)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class BuiltTeacher:
    """The run's teacher as one process built it, with what another process would otherwise derive
    again from the config and the weights file: the resolved model config and the weights' checksum.

    The Ray executors build it once on the driver and hand it to every actor and Train worker
    through the object store (one copy per node), so those neither rebuild the teacher nor check
    its weights again, and their nodes need no weights file (:meth:`RunContext.built_teacher`).
    """

    model: nn.Module
    model_cfg: ModelConfig
    sha256: str


#: The folder of a run location that holds its synthetic dataset.
DATA_DIR = "data"


@dataclass
class RunContext:
    """A run config with its model config resolved and its storage opened.

    ``given_teacher``: the teacher another process built (:class:`BuiltTeacher`); :meth:`teacher`
    then copies it, and :attr:`model_cfg` and :attr:`teacher_sha256` are its own.
    """

    cfg: RunConfig
    storage: Storage
    given_teacher: BuiltTeacher | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Every process that works on a run (the driver, an actor, a Train worker, a trial) opens
        # it here first: its CPU allocator is set before the work starts.
        if self.cfg.cpu_allocator == "reuse":
            reuse_freed_memory()

    @classmethod
    def create(cls, cfg: RunConfig, teacher: BuiltTeacher | None = None) -> RunContext:
        """The context of ``cfg``, its synthesis plan resolved for the teacher's class count.

        With ``generate.min_images_per_class`` set, a plan with too few images per class grows here
        (:meth:`~intraq_core.config.SynthConfig.for_classes`, the same image-iterations), so every
        stage, actor and worker reads the plan from ``ctx.cfg`` and ``run.yaml`` records it; the
        resolution is idempotent (an actor given the driver's config changes nothing).
        """
        ctx = cls(cfg, Storage.from_config(cfg.storage), teacher)
        g = cfg.generate
        if g.min_images_per_class > 0:  # only then is the model resolved here
            plan = g.for_classes(ctx.num_classes)
            if plan is not g:
                log.info(
                    "generate: %d images x %d iterations -> %d x %d for a %d-class teacher "
                    "(generate.min_images_per_class=%g, the same image-iterations)",
                    g.num_images,
                    g.iterations,
                    plan.num_images,
                    plan.iterations,
                    ctx.num_classes,
                    g.min_images_per_class,
                )
                ctx.cfg = cfg.model_copy(update={"generate": plan})
        return ctx

    @cached_property
    def model_cfg(self) -> ModelConfig:
        if self.given_teacher is not None:
            return self.given_teacher.model_cfg
        return resolve_model_config(self.cfg.model)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.model_cfg.image_size or 32
        return (3, size, size)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the model expects of its [0, 1] RGB input."""
        m = self.model_cfg
        assert m.mean is not None and m.std is not None
        return tuple(m.mean), tuple(m.std)

    @property
    def num_classes(self) -> int:
        assert self.model_cfg.num_classes is not None
        return self.model_cfg.num_classes

    @cached_property
    def device(self) -> torch.device:
        """The device of the model work: ``device`` resolved here (``cuda`` without a GPU is an error)."""
        return resolve_device(self.cfg.device)

    @cached_property
    def driver_device(self) -> torch.device:
        """The device of this process's own small work (calibration, evaluation) as the driver.

        With the ray executor the GPUs belong to the actors and Train workers: a driver without
        one (a CPU head node) works on the CPU even for ``device: cuda``.
        """
        if self.cfg.executor == "ray" and self.cfg.device == "cuda" and not torch.cuda.is_available():
            return torch.device("cpu")
        return self.device

    def teacher(self) -> nn.Module:
        """A fresh frozen copy of the full-precision teacher, in eval mode, on CPU."""
        if self.given_teacher is not None:
            return copy.deepcopy(self.given_teacher.model)
        model = create_model(self.model_cfg)
        return model.eval().requires_grad_(False)

    @cached_property
    def teacher_sha256(self) -> str:
        if self.given_teacher is not None:
            return self.given_teacher.sha256
        return state_dict_sha256(self.teacher())

    @cached_property
    def dataset_storage(self) -> Storage:
        """Where the run's synthetic dataset lives: ``<run>/data``, or ``<cfg.dataset>/data``; opened once
        per context (one filesystem client for every stage of the run)."""
        if self.cfg.dataset is not None:
            other = self.cfg.storage.model_copy(update={"url": self.cfg.dataset})
            return Storage.from_config(other).child(DATA_DIR)
        return self.storage.child(DATA_DIR)

    def built_teacher(self, model: nn.Module | None = None) -> BuiltTeacher:
        """The teacher to hand to other processes: ``model`` (a :meth:`teacher` of this run; default
        a fresh one) with the resolved config and its checksum (computed at most once per context)."""
        model = model if model is not None else self.teacher()
        if "teacher_sha256" not in self.__dict__:
            self.__dict__["teacher_sha256"] = state_dict_sha256(model)
        return BuiltTeacher(model, self.model_cfg, self.teacher_sha256)
