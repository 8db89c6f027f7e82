"""The checks of a run before any work: bad input fails here in one line, before Ray starts and before the
location is touched.

Flags, the device, the teacher and the model check, the generation plan, the test set, the probe set
and the run location (writable; free, or holding this very run when resuming). Nothing is written
but a probe object that is deleted again.
"""

from __future__ import annotations

import torch

from intraq_core.errors import ModelError, first_line
from pipeline.config import RUN_CONFIG_PATH, RunConfig
from pipeline.context import RunContext
from pipeline.errors import InputError, RunExistsError
from pipeline.stages.holdout import probe_storage
from pipeline.storage.manifest import Manifest


def check_flags(resume: bool, overwrite: bool, repair: bool) -> None:
    if resume and overwrite:
        raise InputError("--resume and --overwrite are mutually exclusive")
    if repair and overwrite:
        raise InputError("--repair and --overwrite are mutually exclusive (--repair continues the run)")


def check_device(cfg: RunConfig, cluster: str | None = None) -> None:
    """``device: cuda`` (or ``ray.use_gpu: yes``) where the run can only have this machine's GPUs
    and it has none: one line before anything is written (not from a generation actor, after
    ``run.yaml`` and the log were written). A Ray cluster elsewhere (``--cluster``, ``ray.address``)
    is not checked: it may scale up GPU nodes on demand."""
    wants_gpu = cfg.device == "cuda" or (cfg.executor == "ray" and cfg.ray.use_gpu == "yes")
    if not wants_gpu or torch.cuda.is_available():
        return
    from pipeline.ray.session import runs_on_this_machine

    if cfg.executor == "ray" and not runs_on_this_machine(cfg, cluster):
        return
    if cfg.device == "cuda":
        asked, instead = "device=cuda", "device=auto or device=cpu"
    else:
        asked, instead = "ray.use_gpu=yes", "ray.use_gpu=auto or ray.use_gpu=no"
    where = "this machine" if cfg.executor == "local" else "this machine (where the run's local Ray runs)"
    raise InputError(
        f"{asked}, but {where} has no CUDA GPU (torch.cuda.is_available() is False); use {instead}, or run on a "
        "GPU cluster (--cluster FILE)"
    )


def check_inputs(ctx: RunContext, *, generate: bool = True, evaluate: bool = True) -> None:
    """Fail with one line on bad input, before anything is started or written.

    Resolves the model and loads the teacher (unknown architecture; missing weights; a checkpoint
    that does not fit, listing missing/unexpected keys; one that needs arbitrary unpickling,
    refused because loading is weights-only; a user's callable that raises), checks the generation
    plan, runs the model check (:func:`intraq_core.preflight.check_model`: one forward of the
    teacher and of the quantized student on 2 random images, on the run's device; BatchNorm and
    the recorded feature when ``generate``) and checks that the test set's
    classes fit the model. Config values (bits, learning rates, batch sizes, iterations, unknown
    keys) were already validated when the config loaded.
    """
    cfg = ctx.cfg
    try:
        ctx.model_cfg  # noqa: B018 - resolves arch, classes, normalization
        ctx.teacher_sha256  # noqa: B018 - builds the teacher with its weights (cached for the stages)
    except (ValueError, OSError) as exc:
        raise InputError(
            f"cannot load the teacher (model.arch={cfg.model.arch!r}, model.weights={cfg.model.weights!r}): "
            f"{first_line(exc)}"
        ) from exc
    if generate:
        from pipeline.stages.plan import make_plan

        try:
            make_plan(cfg, ctx.num_classes)
        except ValueError as exc:
            raise InputError(f"generate.num_images={cfg.generate.num_images}: {first_line(exc)}") from exc
    from intraq_core.preflight import check_model

    device = ctx.driver_device  # device: cuda without a GPU fails here, in one line
    try:
        check_model(ctx.teacher(), ctx.model_cfg, cfg.quant, cfg.generate if generate else None, device=device)
    except ModelError as exc:
        raise InputError(first_line(exc)) from exc
    if evaluate:
        from intraq_core.data import load_test_set

        try:
            load_test_set(cfg.eval, ctx.model_cfg)
        except (ValueError, OSError) as exc:
            raise InputError(f"eval.data={cfg.eval.data!r}: {first_line(exc)}") from exc


def check_location(ctx: RunContext, *, resume: bool, overwrite: bool, probe: bool = True) -> None:
    """The location is writable (``probe``, failing fast: :meth:`~pipeline.storage.store.Storage.fail_fast`)
    and free (or holds this very run, being resumed). Writes nothing but a probe object that it
    deletes again (and the directories it had to create for it)."""
    storage = ctx.storage
    if probe:
        storage.fail_fast().check_writable()
    if not storage.exists(RUN_CONFIG_PATH):
        return
    if not (resume or overwrite):
        raise RunExistsError(
            f"{storage.url} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    if resume:
        import yaml

        prev_cfg = RunConfig.model_validate(yaml.safe_load(storage.read_bytes(RUN_CONFIG_PATH).decode()))
        if prev_cfg.config_hash() != ctx.cfg.config_hash():
            raise RunExistsError(
                f"{storage.url} holds a run of a different config; --resume needs the same config "
                "(use --overwrite or another location)"
            )


def check_probe(ctx: RunContext) -> None:
    """``distill.probe`` names a location holding a synthetic dataset (checked before any work)."""
    storage = probe_storage(ctx)
    if storage is not None and not Manifest.exists(storage):
        raise InputError(
            f"distill.probe={ctx.cfg.distill.probe}: no synthetic dataset there (data/manifest.json missing); "
            "generate one first (intraq-pipeline generate -o LOCATION)"
        )
