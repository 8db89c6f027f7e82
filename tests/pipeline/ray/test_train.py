"""Distillation on Ray Train (``pipeline.ray.train``) against the real teacher, tiny budget.

One synthetic dataset for the module (``generate_local``, real CIFAR-10 ResNet-20 teacher):
128 images x 8 iterations in 2 shards. Two ``TorchTrainer.fit()`` calls in all (~15-20 s of fixed
cost each), on the session's two-node cluster:

* **2 workers = 1 process (N-invariance), across a failure and a resume.** Full-batch steps
  without augmentation and without a held-out split (2 epochs x 3 steps of all 128 images, lr
  1e-3): the gradient of a step is then the same mean over the same images whichever way the batch
  is split, so the recipe must not change with the number of workers: the same ``optimizer_steps``
  and ``global_batch_size``, and the same student up to float summation order. Through
  ``train_stage`` with ``max_failures=0``: the first fit fails at the start of epoch 1, and
  ``train_stage(resume=True)`` continues from the epoch-0 checkpoint it left (the resumed fit does
  not restart from scratch). Compared with the local executor on the same config. The resumed fit
  shows progress: one epoch bar (rank 0's ``tqdm_ray`` bar) reaches the driver, full and closed.

The 1-worker run equal to the local executor bit for bit (every loss, lr, step and held-out
agreement, and the student) is checked on the whole CLI path in ``test_concurrency.py``, with
another driver on the cluster at the same time; the held-out agreement summed over two workers
against the local executor in ``test_run_s3.py`` (two nodes, streamed data).
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
from pipeline.context import RunContext
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
from tests.pipeline.ray_fixtures import terminal_bars

EPOCHS = 2
TEST_IMAGES = 500


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
    return cfg, train_local(ctx, Manifest.load(ctx.dataset_storage), progress=False)


@pytest.fixture(scope="module")
def n_invariance(ray_cluster: Any, dataset_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The full-batch recipe on 2 Train workers through ``train_stage`` (the fit fails at epoch 1,
    then ``--resume`` finishes it), and the same recipe in one process (the local executor)."""
    from ray.train import TrainingFailedError

    from pipeline.run.job import train_stage

    base = tmp_path_factory.mktemp("two")
    url, marker = str(base / "run"), base / "failed-once"
    cfg = train_config(
        url, dataset_url, *FULL_BATCH, "ray.train_workers=2", "ray.cpus_per_train_worker=1", "ray.max_failures=0"
    )
    mp = pytest.MonkeyPatch()
    mp.setenv(FAIL_ONCE_ENV, f"1:{marker}")
    try:
        with pytest.raises(TrainingFailedError):
            train_stage(cfg, progress=False)
    finally:
        mp.undo()
    kept = [p for p in (Path(url) / "ray_train" / train_run_name(cfg)).glob("checkpoint_*") if p.is_dir()]
    with terminal_bars() as bars:  # the resumed fit shows its epoch bar (rank 0's) on the driver's terminal
        metrics = train_stage(cfg, resume=True, progress=True)
        bars.wait(lambda b: any(s["closed"] for s in b.named("distill (ray)")))
    history = json.loads((Path(url) / TRAIN_HISTORY_PATH).read_text())
    local_cfg, one = _local(dataset_url, tmp_path_factory.mktemp("one-process"), *FULL_BATCH)
    return {
        "cfg": cfg,
        "url": Path(url),
        "metrics": metrics,
        "history": history,
        "marker": marker,
        "kept": kept,
        "one": one,
        "local_url": Path(local_cfg.storage.url),
        "epoch_bars": bars.named("distill (ray)"),
    }


@pytest.mark.timeout(120)
def test_driver_picks_the_local_calibration_images(dataset_url: str, tmp_path: Path) -> None:
    """The Ray driver calibrates on exactly the local executor's batches, reading only those rows."""
    cfg = train_config(str(tmp_path / "run"), dataset_url)
    ctx = RunContext.create(cfg)
    storage = ctx.dataset_storage
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


@pytest.mark.timeout(120)
def test_workers_read_their_share_themselves(dataset_url: str, tmp_path: Path) -> None:
    """In memory mode each worker reads its rows straight from the shards (no Ray Data pipeline):
    one worker holds exactly the local executor's training and held-out images and labels, in its
    order; two workers hold contiguous halves of them, which together are the same images."""
    from pipeline.ray.train_data import WorkerData, data_config, ray_datasets

    cfg = train_config(str(tmp_path / "run"), dataset_url)
    ctx = RunContext.create(cfg)
    storage = ctx.dataset_storage
    manifest = Manifest.load(storage)
    images, labels, indices = load_dataset(ctx, manifest)
    hold = holdout_mask(indices, cfg.seed, cfg.distill.holdout_fraction)
    assert int((~hold).sum()) == 89  # of 128: the held-out split is by a hash of the index

    def shares(workers: int) -> list[WorkerData]:
        wcfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"train_workers": workers})})
        plan = plan_training(RunContext.create(wcfg), manifest)
        assert plan.data == "memory" and ray_datasets(storage, manifest, plan, cfg.seed) is None
        config = {**data_config(plan, manifest), "run_config": wcfg.to_dict()}
        return [WorkerData(config, r, workers, torch.device("cpu"), 8, storage).wait() for r in range(workers)]

    (one,) = shares(1)
    assert torch.equal(one.train_x, images[~hold]) and torch.equal(one.train_y, labels[~hold])
    assert one.hold_x is not None and torch.equal(one.hold_x, images[hold])
    two = shares(2)
    assert [w.train_x.shape[0] for w in two] == [45, 44]
    assert torch.equal(torch.cat([w.train_x for w in two]), images[~hold])
    assert torch.equal(torch.cat([w.train_y for w in two]), labels[~hold])
    assert torch.equal(torch.cat([w.hold_x for w in two if w.hold_x is not None]), images[hold])


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
    """Streaming workers that would leave no CPU to Ray Data's readers are refused before anything starts."""
    cfg = train_config(
        str(tmp_path / "run"),
        dataset_url,
        "ray.train_workers=4",
        "ray.cpus_per_train_worker=1",
        "ray.train_data=stream",
    )
    ctx = RunContext.create(cfg)
    with pytest.raises(ValueError, match="training would hang"):
        train_ray(ctx, Manifest.load(ctx.dataset_storage), progress=False)
    assert not (tmp_path / "run" / CALIBRATED_PATH).exists()


def test_streaming_refuses_epochs_longer_than_a_pass(dataset_url: str, tmp_path: Path) -> None:
    """Streamed from storage, an epoch is one pass: a longer ``iterations_per_epoch`` is one clear error."""
    cfg = train_config(str(tmp_path / "run"), dataset_url, "ray.train_data=stream", "distill.iterations_per_epoch=50")
    ctx = RunContext.create(cfg)
    with pytest.raises(ValueError, match="an epoch is one pass over the data"):
        plan_training(ctx, Manifest.load(ctx.dataset_storage))
    manifest = Manifest.load(ctx.dataset_storage)
    small = train_config(str(tmp_path / "run"), dataset_url, "ray.train_memory_gb=0.0001")
    assert plan_training(RunContext.create(small), manifest).data == "stream"  # auto: does not fit
    assert plan_training(RunContext.create(train_config(str(tmp_path), dataset_url)), manifest).data == "memory"


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_two_workers_train_the_one_worker_recipe(n_invariance: dict[str, Any], ray_cluster: Any) -> None:
    history = n_invariance["history"]
    metrics = n_invariance["metrics"]
    one: TrainOutcome = n_invariance["one"]
    # The first fit failed at the start of epoch 1 and left its epoch-0 checkpoint; the resumed fit
    # continued from it (epoch 0 is the first attempt's, epoch 1 the second's).
    assert n_invariance["marker"].exists(), "the failure hook did not fire"
    assert len(n_invariance["kept"]) == 1, "the failed fit should leave the epoch-0 checkpoint"
    assert [row["epoch"] for row in history] == list(range(EPOCHS))
    assert [row["attempt"] for row in history] == [1, 2], "the resumed fit restarted from scratch"
    assert all(row["workers"] == 2 for row in history)
    # One epoch bar (rank 0's, not one per worker) reached the driver, closed at the last epoch.
    (bar,) = n_invariance["epoch_bars"]
    assert (bar["x"], bar["total"], bar["closed"]) == (EPOCHS, EPOCHS, True)
    assert metrics["executor"] == "ray" and metrics["test_images"] == TEST_IMAGES
    assert metrics["training"]["data"] == "memory"

    # The recipe does not depend on the number of workers.
    assert (metrics["train_workers"], one.train_workers) == (2, 1)
    assert metrics["global_batch_size"] == one.global_batch_size == 128
    assert one.steps_per_epoch == 3
    assert metrics["optimizer_steps"] == one.optimizer_steps == EPOCHS * 3
    assert [row["step"] for row in history] == [row["step"] for row in one.history]
    assert [row["lr"] for row in history] == [row["lr"] for row in one.history]
    for a, b in zip(history, one.history, strict=True):
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


def test_workers_wait_for_the_calibrated_student_or_its_failure(tmp_path: Path) -> None:
    """A worker reads student_calibrated.pt once the driver has written it, and stops on the failure note."""
    import threading

    from pipeline.ray.train_worker import CALIBRATION_FAILED_PATH, wait_for_calibrated
    from pipeline.storage.store import Storage

    storage = Storage.from_url(str(tmp_path))
    later = threading.Timer(0.3, storage.write_bytes_atomic, (CALIBRATED_PATH, b"student"))
    later.start()
    assert wait_for_calibrated(storage) == b"student"
    storage.delete(CALIBRATED_PATH)
    storage.write_bytes_atomic(CALIBRATION_FAILED_PATH, b"ValueError: boom")
    with pytest.raises(RuntimeError, match="the driver's calibration failed: ValueError: boom"):
        wait_for_calibrated(storage)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_the_worker_group_starts_while_the_driver_calibrates(
    ray_cluster: Any, dataset_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fit()`` is called before the calibration ends (a stand-in trainer that waits for the file like a
    worker); a stale calibrated student is not taken for the new one; a failed calibration stops the
    workers and is the error the driver raises."""
    import threading
    from types import SimpleNamespace

    import ray.train.torch

    import pipeline.ray.train as ray_train
    from pipeline.ray.train_worker import CALIBRATION_FAILED_PATH, wait_for_calibrated

    fit_called = threading.Event()
    read: list[bytes] = []
    real_calibrate = ray_train.calibrate_student
    fail: list[Exception] = []

    def calibrate(*args: Any, **kwargs: Any) -> Any:
        assert fit_called.wait(timeout=60), "the driver calibrated before starting the worker group"
        if fail:
            raise fail[0]
        return real_calibrate(*args, **kwargs)

    class Trainer:
        def __init__(self, _: Any, *, train_loop_config: dict[str, Any], **__: Any) -> None:
            self.config = train_loop_config

        def fit(self) -> Any:
            fit_called.set()
            read.append(wait_for_calibrated(ctx.storage))  # what every worker does first
            report = {
                "history": [],
                "agreement_calibrated": None,
                "agreement_final": None,
                "selection": None,
                "steps_per_epoch": 3,
                "optimizer_steps": 6,
                "loop_start_unix": None,
                "epoch_seconds": [],
                "device": "cpu",
            }
            return SimpleNamespace(metrics={"summary": report}, path="stand-in")

    monkeypatch.setattr(ray_train, "calibrate_student", calibrate)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    cfg = train_config(str(tmp_path / "run"), dataset_url)
    ctx = RunContext.create(cfg)
    ctx.storage.write_bytes_atomic(CALIBRATED_PATH, b"an earlier attempt's")
    manifest = Manifest.load(ctx.dataset_storage)
    outcome = train_ray(ctx, manifest, progress=False)
    assert outcome.optimizer_steps == 6
    assert read == [(tmp_path / "run" / CALIBRATED_PATH).read_bytes()] != [b"an earlier attempt's"]
    load_student(tmp_path / "run" / CALIBRATED_PATH)  # a student checkpoint

    fit_called.clear()
    fail.append(ValueError("calibration went wrong"))
    with pytest.raises(ValueError, match="calibration went wrong"):
        train_ray(RunContext.create(cfg), manifest, progress=False)
    assert b"ValueError: calibration went wrong" in ctx.storage.read_bytes(CALIBRATION_FAILED_PATH)
    assert not ctx.storage.exists(CALIBRATED_PATH)
