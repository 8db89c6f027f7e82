"""Fewer synthetic images than classes: 4 images of the 10-class CIFAR-10 teacher, end to end.

The IntraQ paper's ImageNet budget is 256 images for 1,000 classes. Here the real CIFAR-10
ResNet-20 gets 4 images in 2 shards of 2 over 2 rounds (round 1 sees the class centres of
round 0, whose classes it does not have), then calibration, distillation, evaluation and the
report, which has no intra-class diversity to show (no class has two images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_run_config
from pipeline.report.render import build_report
from pipeline.run.job import run_pipeline
from pipeline.storage.manifest import Manifest, read_all, validate_dataset
from pipeline.storage.store import Storage

pytestmark = pytest.mark.timeout(300)

FOUR = [
    "executor=local",
    "device=cpu",
    "generate.num_images=4",
    "generate.batch_size=2",
    "generate.iterations=3",
    "generate.shards_per_round=1",
    "quant.calibration_batches=1",
    "distill.epochs=1",
    "distill.batch_size=2",
    "distill.iterations_per_epoch=1",
    "distill.select=final",
    "eval.limit=100",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    url = tmp_path_factory.mktemp("few") / "run"
    run_pipeline(load_run_config("smoke", [*FOUR, f"storage.url={url}"]), progress=False)
    return url


def test_four_images_of_ten_classes_each_get_their_own_class(run: Path) -> None:
    data = Storage.from_url(str(run / "data"))
    manifest = Manifest.load(data)
    assert manifest.is_complete() and len(manifest.shards) == 2 and validate_dataset(data, manifest) == []
    images, labels = read_all(data, manifest)
    # label_plan(4, 10, seed=0): the first 4 classes of the seeded permutation, ascending
    # (tests/intraq_core/synth/test_labels_centres.py).
    assert labels.tolist() == [4, 5, 6, 9]
    assert images.shape == (4, 3, 32, 32) and np.isfinite(images).all()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and metrics["dataset_shards"] == 2
    assert metrics["fp_top1"] > 80.0 and metrics["quant_top1"] is not None


def test_report_of_a_dataset_without_repeated_classes(run: Path) -> None:
    result = build_report(str(run), real_images=0, tsne=False)
    (row,) = result.stats["diversity"]
    assert row["images"] == 4 and row["classes"] == 4
    assert row["pairwise"] is None and row["to_centre"] is None
    assert "| 4 | 4 | — | — |" in (run / "report" / "report.md").read_text()


def test_min_images_per_class_grows_the_plan_to_the_teachers_classes(tmp_path: Path, data_dir: Path) -> None:
    """4 images x 6 iterations with ``generate.min_images_per_class=1`` on the 10-class teacher: the run
    opens as 12 images (10 rounded up to whole batches of 4) x 2 iterations, the same 24
    image-iterations, generates that, and records it in run.yaml and metrics."""
    from pipeline.run.job import open_run

    url = tmp_path / "run"
    sets = [*FOUR, "generate.batch_size=4", "generate.iterations=6", "generate.min_images_per_class=1"]
    cfg = load_run_config("smoke", [*sets, f"storage.url={url}"])
    run = open_run(cfg, "generate")
    assert (run.ctx.cfg.generate.num_images, run.ctx.cfg.generate.iterations) == (12, 2)
    run.execute(progress=False)
    data = Storage.from_url(str(url / "data"))
    _, labels = read_all(data, Manifest.load(data))
    assert sorted(labels.tolist()) == sorted([*range(10), 0, 1])  # every class, balanced
    recorded = load_run_config(url / "run.yaml")
    assert (recorded.generate.num_images, recorded.generate.iterations) == (12, 2)
    again = open_run(recorded, "generate", resume=True)
    assert again.ctx.cfg.generate == recorded.generate  # resolved once: reopening changes nothing
