"""Distillation on Ray Train (``pipeline.ray.train``) against the real teacher, tiny budget.

One synthetic dataset for the module (``generate_local``, real CIFAR-10 ResNet-20 teacher):
128 images x 8 iterations in 2 shards. Three ``TorchTrainer.fit()`` calls in all (~15-20 s of
fixed cost each), on the session's two-node cluster:

* **1 worker = the local executor, bit for bit, across a failure.** A quarter held out, W4A4,
  2 epochs x 3 steps of 16 images, lr 1e-4. Through ``train_stage`` with ``max_failures=0``:
  the first fit fails at the start of epoch 1, ``train_stage(resume=True)`` continues from the
  epoch-0 checkpoint. The worker reads its share once (resident), in the local executor's order,
  and resumes exactly, so the final student and the whole history (held-out agreement included)
  equal the local executor's.
* **2 workers = 1 worker (N-invariance).** Full-batch steps without augmentation and without a
  held-out split (2 epochs x 3 steps of all 128 images, lr 1e-2): the gradient of a step is then
  the same mean over the same images whichever way the batch is split, so the recipe must not
  change with the number of workers: the same ``optimizer_steps`` and ``global_batch_size``, and
  the same student up to float summation order. The worker group fails once at the start of
  epoch 1 (``max_failures=1``) and resumes from its epoch-0 checkpoint within the fit. Compared
  with the local executor on the same config (which the first test shows is the 1-worker Ray run).

The held-out agreement summed over two workers is checked against the local executor in
``test_run_s3.py`` (two nodes, streamed data).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from intraq_core.distill import Distiller
from intraq_core.student import build_student, load_student
from pipeline.config import RunConfig, load_run_config
from pipeline.context import RunContext, dataset_storage
from pipeline.ray.train import train_ray, train_run_name
from pipeline.ray.train_plan import plan_training, read_images
from pipeline.ray.train_worker import FAIL_ONCE_ENV
from pipeline.stages.calibration import calibration_batches, calibration_positions
from pipeline.stages.generate import generate_local
from pipeline.stages.holdout import holdout_mask
from pipeline.stages.train import (
    CALIBRATED_PATH,
    STUDENT_PATH,
    TRAIN_HISTORY_PATH,
    TrainOutcome,
    load_dataset,
    train_local,
)
from pipeline.stages.train_state import parse_train_state, train_state_bytes
from pipeline.storage.manifest import Manifest

EPOCHS = 2
TEST_IMAGES = 500
RAY_TAGS = ("attempt", "workers")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """This process's torch work (driver-side calibration, evaluation, the local reference) on
    one thread, like the Ray workers: on a busy 2-core box two OpenMP threads made a small
    training step ~60x slower (5 s instead of 0.08 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_config(url: str, dataset: str, *extra: str) -> RunConfig:
    return load_run_config(
        None,
        [
            "model.weights=cifar10-resnet20",
            "generate.num_images=128",
            "generate.batch_size=64",
            "generate.iterations=8",
            "generate.shards_per_round=2",
            "quant.w_bits=4",
            "quant.a_bits=4",
            "quant.calibration_batches=2",
            f"distill.epochs={EPOCHS}",
            "distill.batch_size=16",
            "distill.iterations_per_epoch=3",
            "distill.lr=1e-4",
            "distill.holdout_fraction=0.25",
            "distill.checkpoint_every=1",
            f"eval.limit={TEST_IMAGES}",
            "device=cpu",
            "executor=ray",
            f"dataset={dataset}",
            f"storage.url={url}",
            *extra,
        ],
    )


#: N-invariance: full-batch steps, no augmentation, nothing held out (see the module docstring).
FULL_BATCH = (
    "distill.batch_size=128",
    "distill.holdout_fraction=0",
    "distill.crop_scale=[1.0, 1.0]",
    "distill.flip=false",
    "distill.lr=1e-3",
)


@torch.no_grad()
def logits_on_test_images(cfg: RunConfig, student_path: Path) -> torch.Tensor:
    """The student's logits on the first ``TEST_IMAGES`` real test images."""
    from intraq_core.data import load_test_set

    student = load_student(student_path)[0]
    test_set = load_test_set(cfg.eval, RunContext.create(cfg).model_cfg)
    return torch.cat([student(x) for x, _ in test_set.batches(cfg.eval.batch_size)])


@pytest.fixture(scope="module")
def dataset_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The module's synthetic dataset (a run location with ``data/``), made by the local executor."""
    root = str(tmp_path_factory.mktemp("dataset") / "run")
    cfg = train_config(root, root).model_copy(update={"dataset": None, "executor": "local"})
    generate_local(RunContext.create(cfg), progress=False)
    return root


def _local(dataset_url: str, base: Path, *extra: str) -> tuple[RunConfig, TrainOutcome]:
    url = str(base / "run")
    cfg = train_config(url, dataset_url, "executor=local", *extra)
    ctx = RunContext.create(cfg)
    return cfg, train_local(ctx, Manifest.load(dataset_storage(ctx)), progress=False)


@pytest.fixture(scope="module")
def local_run(dataset_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The local executor on the same data and config as the 1-worker run."""
    base = tmp_path_factory.mktemp("local")
    cfg, outcome = _local(dataset_url, base)
    return {"cfg": cfg, "url": base / "run", "outcome": outcome}


@pytest.fixture(scope="module")
def one_worker_resumed(ray_cluster: Any, dataset_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """1 Train worker via ``train_stage``: the fit fails at epoch 1, then ``--resume`` finishes it."""
    from ray.train import TrainingFailedError

    from pipeline.run.job import train_stage

    base = tmp_path_factory.mktemp("one")
    url, marker = str(base / "run"), base / "failed-once"
    cfg = train_config(url, dataset_url, "ray.train_workers=1", "ray.max_failures=0")
    mp = pytest.MonkeyPatch()
    mp.setenv(FAIL_ONCE_ENV, f"1:{marker}")
    try:
        with pytest.raises(TrainingFailedError):
            train_stage(cfg, progress=False)
    finally:
        mp.undo()
    kept = [p for p in (Path(url) / "ray_train" / train_run_name(cfg)).glob("checkpoint_*") if p.is_dir()]
    metrics = train_stage(cfg, resume=True, progress=False)
    history = json.loads((Path(url) / TRAIN_HISTORY_PATH).read_text())
    return {"cfg": cfg, "url": Path(url), "metrics": metrics, "history": history, "marker": marker, "kept": kept}


@pytest.fixture(scope="module")
def n_invariance(ray_cluster: Any, dataset_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The full-batch recipe on 2 Train workers (failing once at epoch 1) and in one process."""
    base = tmp_path_factory.mktemp("two")
    url, marker = str(base / "run"), base / "failed-once"
    cfg = train_config(
        url, dataset_url, *FULL_BATCH, "ray.train_workers=2", "ray.cpus_per_train_worker=1", "ray.max_failures=1"
    )
    ctx = RunContext.create(cfg)
    mp = pytest.MonkeyPatch()
    mp.setenv(FAIL_ONCE_ENV, f"1:{marker}")
    try:
        two = train_ray(ctx, Manifest.load(dataset_storage(ctx)), progress=False)
    finally:
        mp.undo()
    local_cfg, one = _local(dataset_url, tmp_path_factory.mktemp("one-process"), *FULL_BATCH)
    return {"cfg": cfg, "url": Path(url), "two": two, "one": one, "local_url": Path(local_cfg.storage.url)}


@pytest.mark.timeout(120)
def test_driver_picks_the_local_calibration_images(dataset_url: str, tmp_path: Path) -> None:
    """The Ray driver calibrates on exactly the local executor's batches, reading only those rows."""
    cfg = train_config(str(tmp_path / "run"), dataset_url)
    ctx = RunContext.create(cfg)
    storage = dataset_storage(ctx)
    manifest = Manifest.load(storage)
    images, _, indices = load_dataset(ctx, manifest)
    plan = plan_training(ctx, manifest)
    assert np.array_equal(plan.order, indices)
    hold = holdout_mask(indices, cfg.seed, cfg.distill.holdout_fraction)
    assert np.array_equal(plan.holdout_indices, indices[hold]) and plan.num_train == int((~hold).sum())
    want = calibration_batches(images[~hold], ctx)
    for batch, positions in zip(want, calibration_positions(plan.num_train, ctx), strict=True):
        got = read_images(storage, manifest, plan, plan.train_indices[positions.numpy()])
        assert torch.equal(got, batch)
    assert torch.equal(read_images(storage, manifest, plan, plan.holdout_indices[::-1].copy()), images[hold].flip(0))


def test_checkpoint_format_is_weights_only_and_resumes_exactly(tmp_path: Path) -> None:
    """The one checkpoint format: loads with weights_only=True, continues training bit for bit,
    carries executor bookkeeping, and is refused for another training."""
    from intraq_core.config import DistillConfig, ModelConfig, QuantConfig
    from intraq_core.models import create_model
    from intraq_core.quant import calibrate_ranges

    torch.manual_seed(0)
    teacher = create_model(ModelConfig(arch="cifar_resnet20", num_classes=10)).eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))  # small: this is about state, not quality

    def fresh() -> Distiller:
        student = build_student(teacher, QuantConfig(calibration_batches=1))
        torch.manual_seed(1)
        calibrate_ranges(student, [torch.randn(4, 3, 16, 16)])
        return Distiller(student, teacher, DistillConfig(epochs=2, batch_size=4), steps_per_epoch=2, seed=3)

    identity = {"config_hash": "c", "dataset": "d", "num_train": 4}
    a = fresh()
    a.step(x, y)
    raw = train_state_bytes(identity, 0, [{"epoch": 0, "loss": 1.0}], a, extra={"attempt": 1})
    state = parse_train_state(raw, identity, "test")  # weights_only=True inside
    assert state is not None and state["epoch"] == 0 and state["extra"] == {"attempt": 1}
    assert parse_train_state(raw, {**identity, "num_train": 5}, "test") is None
    b = fresh()
    b.load_state_dict(state["distiller"])
    sa, sb = a.step(x, y), b.step(x, y)
    assert (sa.loss, sa.lr) == (sb.loss, sb.lr)
    for (ka, va), (kb, vb) in zip(a.student.state_dict().items(), b.student.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_too_many_train_cpus_fail_fast(ray_cluster: Any, dataset_url: str, tmp_path: Path) -> None:
    """Workers that would leave no CPU to Ray Data's readers are refused before anything starts."""
    cfg = train_config(str(tmp_path / "run"), dataset_url, "ray.train_workers=4", "ray.cpus_per_train_worker=1")
    ctx = RunContext.create(cfg)
    with pytest.raises(ValueError, match="training would hang"):
        train_ray(ctx, Manifest.load(dataset_storage(ctx)), progress=False)
    assert not (tmp_path / "run" / CALIBRATED_PATH).exists()


def test_streaming_refuses_epochs_longer_than_a_pass(dataset_url: str, tmp_path: Path) -> None:
    """Streamed from storage, an epoch is one pass: a longer ``iterations_per_epoch`` is one clear error."""
    cfg = train_config(str(tmp_path / "run"), dataset_url, "ray.train_data=stream", "distill.iterations_per_epoch=50")
    ctx = RunContext.create(cfg)
    with pytest.raises(ValueError, match="an epoch is one pass over the data"):
        plan_training(ctx, Manifest.load(dataset_storage(ctx)))
    manifest = Manifest.load(dataset_storage(ctx))
    small = train_config(str(tmp_path / "run"), dataset_url, "ray.train_memory_gb=0.0001")
    assert plan_training(RunContext.create(small), manifest).data == "stream"  # auto: does not fit
    assert plan_training(RunContext.create(train_config(str(tmp_path), dataset_url)), manifest).data == "memory"


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_one_worker_resumes_to_exactly_the_local_student(
    one_worker_resumed: dict[str, Any], local_run: dict[str, Any]
) -> None:
    history = one_worker_resumed["history"]
    assert one_worker_resumed["marker"].exists(), "the failure hook did not fire"
    assert len(one_worker_resumed["kept"]) == 1, "the failed fit should leave the epoch-0 checkpoint"
    assert [row["epoch"] for row in history] == list(range(EPOCHS))
    assert [row["attempt"] for row in history] == [1, 2], "the resumed fit restarted from scratch"
    assert all(row["workers"] == 1 for row in history)

    local: TrainOutcome = local_run["outcome"]
    stripped = [{k: v for k, v in row.items() if k not in RAY_TAGS} for row in history]
    assert stripped == local.history  # every loss, lr, step and held-out agreement, exactly
    assert all("holdout_agreement" in row for row in history)
    ray_student = load_student(one_worker_resumed["url"] / STUDENT_PATH)[0].state_dict()
    local_student = load_student(local_run["url"] / STUDENT_PATH)[0].state_dict()
    assert ray_student.keys() == local_student.keys()
    for key, value in local_student.items():
        assert torch.equal(ray_student[key], value), key
    # The calibrated student moved: the equality above is not that of two untrained students.
    calibrated = load_student(local_run["url"] / CALIBRATED_PATH)[0].state_dict()
    assert any(not torch.equal(calibrated[k], v) for k, v in local_student.items() if v.is_floating_point())

    metrics = one_worker_resumed["metrics"]
    assert metrics["executor"] == "ray" and metrics["test_images"] == TEST_IMAGES
    assert (metrics["train_workers"], metrics["global_batch_size"]) == (1, 16)
    assert metrics["optimizer_steps"] == EPOCHS * 3 == local.optimizer_steps
    assert metrics["training"]["holdout_agreement_calibrated"] == local.agreement_calibrated
    assert metrics["training"]["holdout_agreement_final"] == local.agreement_final
    assert metrics["training"]["data"] == "memory"
    assert (one_worker_resumed["url"] / "metrics.json").exists()


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_two_workers_train_the_one_worker_recipe(n_invariance: dict[str, Any], ray_cluster: Any) -> None:
    two: TrainOutcome = n_invariance["two"]
    one: TrainOutcome = n_invariance["one"]
    # A worker failed at the start of epoch 1; the group resumed from the epoch-0 checkpoint.
    assert [row["attempt"] for row in two.history] == [1, 2]
    assert all(row["workers"] == 2 for row in two.history)
    assert json.loads((n_invariance["url"] / TRAIN_HISTORY_PATH).read_text()) == two.history

    # The recipe does not depend on the number of workers.
    assert (two.train_workers, one.train_workers) == (2, 1)
    assert two.global_batch_size == one.global_batch_size == 128
    assert two.steps_per_epoch == one.steps_per_epoch == 3
    assert two.optimizer_steps == one.optimizer_steps == EPOCHS * 3
    assert [row["lr"] for row in two.history] == [row["lr"] for row in one.history]
    for a, b in zip(two.history, one.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)

    # Same student up to float summation order, judged against how far training moved it.
    cfg = n_invariance["cfg"]
    calibrated = logits_on_test_images(cfg, n_invariance["url"] / CALIBRATED_PATH)
    two_logits = logits_on_test_images(cfg, n_invariance["url"] / STUDENT_PATH)
    one_logits = logits_on_test_images(cfg, n_invariance["local_url"] / STUDENT_PATH)
    moved = (one_logits - calibrated).abs().mean()
    differ = (two_logits - one_logits).abs().mean()
    assert moved > 0.05, f"training barely moved the student ({moved:.4f}): the comparison would be empty"
    assert differ < 0.01 * moved, (float(differ), float(moved))
    assert (two_logits.argmax(1) == one_logits.argmax(1)).float().mean() >= 0.99
