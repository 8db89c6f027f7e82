"""One trial of a tune search, in its Tune actor, and the fixed probe set every trial is scored on.

What a trial is. One trial = the local executor's run on a small dataset with the trial's
settings: :func:`pipeline.stages.generate.generate_local` into ``<run>/tune/trial-<id>/``, then
:func:`pipeline.stages.train.train_local` (the one training loop) on it. It reports the objective
after every generation round (the agreement of a student calibrated on the images so far:
the post-training-quantization quality of the data, cheap to measure) and after every
distillation epoch, so the ASHA scheduler (``tune.grace_reports`` reports of grace) can stop a
weak trial during generation, before its most expensive phase.

Why a plain function trainable and not Tune + Train. A trial runs in its Tune actor, reserved
with ``tune.with_resources(fn, {"cpu": 1, "gpu": tune.gpus_per_trial})`` (fractional GPUs: small
CIFAR trials share a GPU) and at most ``tune.max_concurrent`` at a time. Nesting a
``TorchTrainer`` per trial would add ~20 s of fixed cost per trial, needs the dashboard's State
API for ASHA to release stopped trials, and deadlocks when trial CPUs + Train worker CPUs exceed
the cluster (docs/ray-on-a-small-box.md); the trials' datasets and models are small, so one
process per trial is both faster and safe on 2 CPUs. Parallelism comes from concurrent trials.

The objective (metric ``objective``, maximized):

* ``agreement`` (default, data-free): top-1 teacher–student agreement (%) on ONE fixed probe
  set of synthetic images, generated once before the search (``<run>/tune/probe-<hash>/``)
  with a fixed recipe that owes nothing to the base config's loss weights or to the searched
  space: the ``bns_ce`` preset (BN statistics + cross-entropy, the ZeroQ/GDFQ-style baseline) at
  the base config's image count and iterations, with a derived seed. Each trial's own held-out
  split is still reported (``holdout_agreement``) but not optimized: it is made of that trial's
  images, so settings that produce easy images would score well on it.
* ``validation``: top-1 (%) on ``tune.validation_data``, a labelled set the user supplies. It is
  refused when it is the evaluation test set (``eval.data``): selecting on the test set would
  make the reported test accuracy optimistic.

A trial whose distillation diverges reports objective 0 (status ``diverged``) rather than
crashing, so the searcher learns to avoid that region.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig, validate_run_config
from pipeline.ray.tune_space import trial_config
from pipeline.storage.store import Storage

__all__ = ["OBJECTIVE", "TUNE_DIR", "probe_config", "probe_images", "run_trial"]

TUNE_DIR = "tune"
PROBE_DIR = "probe"
#: The metric every trial reports and the search maximizes.
OBJECTIVE = "objective"
# Seed purpose of the probe set (different images from any trial's, whatever its settings).
PURPOSE_PROBE = 201


def _subconfig(cfg: RunConfig, url: str, **updates: Any) -> RunConfig:
    data = cfg.to_dict()
    data.update({"executor": "local", "dataset": None, **updates})
    data["storage"] = {**data["storage"], "url": url}
    return validate_run_config(data)


def _trial_objective(cfg: RunConfig, ctx: Any, teacher: Any, probe: Any) -> Any:
    """``objective(student) -> float`` of a trial: probe agreement, or top-1 on the validation set."""
    import torch

    from intraq_core.data import load_test_set
    from intraq_core.evaluate import agreement, top1

    device = ctx.device
    if cfg.tune.objective == "validation":
        assert cfg.tune.validation_data is not None
        eval_cfg = cfg.eval.model_copy(update={"data": cfg.tune.validation_data})
        test_set = load_test_set(eval_cfg, ctx.model_cfg)
        return lambda student: float(top1(student, test_set.batches(eval_cfg.batch_size), device=device)["top1"])
    probe_x = torch.tensor(probe)  # a copy: the shared array is read-only
    return lambda student: float(agreement(student, teacher, probe_x, device=device)["agreement"])


def run_trial(params: dict[str, Any], *, base: dict[str, Any], tune_url: str, probe: Any) -> None:
    """One trial (in a Tune actor): the local executor's generate + train, reporting as it goes."""
    from ray import tune

    from intraq_core.distill import DivergenceError
    from pipeline.context import RunContext, limit_threads
    from pipeline.stages.calibration import prepare_student
    from pipeline.stages.generate import generate_local
    from pipeline.stages.holdout import split_mask
    from pipeline.stages.train import load_dataset, train_local

    limit_threads()
    trial_id = tune.get_context().get_trial_id()
    base_cfg = RunConfig.model_validate(base)
    cfg = _subconfig(trial_config(base_cfg, params), f"{tune_url}/trial-{trial_id}")
    ctx = RunContext.create(cfg)
    ctx.storage.write_bytes_atomic("trial.yaml", cfg.to_yaml().encode())
    teacher = ctx.teacher().to(ctx.device)
    objective = _trial_objective(cfg, ctx, teacher, probe)

    def after_round(manifest: Any) -> None:
        images, _, indices = load_dataset(ctx, manifest)
        hold = split_mask(indices, cfg.seed, cfg.distill.holdout_fraction)
        student = prepare_student(ctx, teacher, images[~hold])
        tune.report({OBJECTIVE: objective(student), "phase": "generate", "shards": len(manifest.shards), "epoch": 0})

    def after_epoch(epoch: int, distiller: Any, rows: list[dict[str, Any]]) -> None:
        row = rows[-1]
        report: dict[str, Any] = {
            OBJECTIVE: objective(distiller.module),
            "phase": "distill",
            "epoch": epoch + 1,
            "loss": float(row["loss"]),
            "train_agreement": 100.0 * float(row["agreement"]),
        }
        if "holdout_agreement" in row:
            report["holdout_agreement"] = float(row["holdout_agreement"])
        tune.report(report)
        done[0] = epoch + 1

    done = [0]
    manifest, _ = generate_local(ctx, progress=False, on_round=after_round)
    try:
        train_local(ctx, manifest, progress=False, on_epoch=after_epoch)
    except DivergenceError:
        # A diverged recipe is a result, not a crash: score it 0 so the searcher learns to avoid it.
        tune.report({OBJECTIVE: 0.0, "phase": "distill", "epoch": done[0] + 1, "diverged": 1.0})


def probe_config(cfg: RunConfig, storage: Storage) -> RunConfig:
    """The probe set's generation config: a fixed ``bns_ce`` recipe, whatever the base weights.

    Only the budget (images, batch, iterations, rounds), the engineering knobs (memory format,
    compile, amp, micro-batches, pixel storage), the model and a seed derived from the run's seed
    are taken from ``cfg``; loss weights, margins and LOR are the preset's.
    """
    from intraq_core.config import SynthConfig
    from intraq_core.seeding import derive_seed

    g = cfg.generate
    recipe = SynthConfig(
        method="bns_ce",
        num_images=g.num_images,
        batch_size=g.batch_size,
        iterations=g.iterations,
        shards_per_round=g.shards_per_round,
        channels_last=g.channels_last,
        compile=g.compile,
        amp=g.amp,
        micro_batch_size=g.micro_batch_size,
        groups_per_pass=g.groups_per_pass,
        store_dtype=g.store_dtype,
    )
    seed = derive_seed(cfg.seed, PURPOSE_PROBE) % 2**31
    probe_cfg = _subconfig(cfg, storage.url, seed=seed, generate=recipe.model_dump(mode="json"))
    where = storage.join(TUNE_DIR, f"{PROBE_DIR}-{probe_cfg.dataset_hash()[:12]}")
    return _subconfig(probe_cfg, where)


def probe_images(cfg: RunConfig, storage: Storage, progress: bool) -> Any:
    """The fixed probe set (:func:`probe_config`), generated once."""
    from pipeline.context import RunContext
    from pipeline.stages.generate import generate_local
    from pipeline.storage.manifest import read_all

    ctx = RunContext.create(probe_config(cfg, storage))
    manifest, _ = generate_local(ctx, progress=progress)
    images, _ = read_all(ctx.storage.child("data"), manifest)
    return images
