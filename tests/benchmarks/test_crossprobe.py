"""The cross held-out signal's arithmetic (benchmarks/crossprobe.py), hand-computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.crossprobe import dataset_images, other_method, over
from pipeline.storage.manifest import Manifest
from pipeline.storage.shards import write_shard
from pipeline.storage.store import Storage


def test_over_weights_each_part_by_its_images() -> None:
    parts = [{"images": 10, "agreement": 90.0, "kl": 0.1}, {"images": 30, "agreement": 50.0, "kl": 0.5}]
    # (10 * 90 + 30 * 50) / 40 = 60; (10 * 0.1 + 30 * 0.5) / 40 = 0.4
    assert over(parts) == pytest.approx({"agreement": 60.0, "kl": 0.4})


def test_other_method_scores_a_student_on_the_other_methods_images_only() -> None:
    scores = {
        "parts": [
            {"row": "a1", "method": "intraq", "images": 10, "agreement": 99.0, "kl": 0.01},
            {"row": "b1", "method": "bns_ce", "images": 30, "agreement": 80.0, "kl": 0.4},
            {"row": "b2", "images": 10, "agreement": 70.0, "kl": 0.6},  # written before parts named their method
        ]
    }
    # an IntraQ student: the two BNS+CE parts, (30 * 0.4 + 10 * 0.6) / 40 = 0.45, agreement 77.5
    got = other_method(scores, "intraq", {"b2": "bns_ce"})
    assert got == pytest.approx({"agreement": 77.5, "kl": 0.45})
    assert other_method(scores, "bns_ce", {"b2": "bns_ce"}) == pytest.approx({"agreement": 99.0, "kl": 0.01})
    assert other_method({"parts": scores["parts"][:1]}, "intraq", {}) is None


def _dataset(storage: Storage, planned: int, written: int) -> np.ndarray:
    """A dataset of ``planned`` shards of 4 images (3 x 2 x 2), ``written`` of them recorded."""
    manifest = Manifest(
        config_hash="c",
        num_shards_planned=planned,
        image_shape=[3, 2, 2],
        num_classes=10,
        mean=[0.5] * 3,
        std=[0.2] * 3,
    )
    meta = {"config_hash": "c", "num_classes": 10, "round": 0, "teacher_sha256": "f" * 64, "seed": 0}
    meta |= {"mean": manifest.mean, "std": manifest.std}
    images = np.random.default_rng(0).normal(size=(4 * planned, 3, 2, 2)).astype(np.float32)
    for k in range(written):
        rows = slice(4 * k, 4 * k + 4)
        ints = np.arange(4 * k, 4 * k + 4, dtype=np.int64)
        info = write_shard(storage, k, images[rows], ints % 10, ints, ints, meta)
        manifest.add_shard(info)
    manifest.save(storage)
    return images


def test_dataset_images_reads_a_dataset_or_a_run_and_refuses_a_partial_one(tmp_path: Path) -> None:
    images = _dataset(Storage.from_url(str(tmp_path / "ds")), planned=2, written=2)
    torch.testing.assert_close(dataset_images(tmp_path / "ds"), torch.from_numpy(images))
    _dataset(Storage.from_url(str(tmp_path / "run" / "data")), planned=2, written=2)
    torch.testing.assert_close(dataset_images(str(tmp_path / "run")), torch.from_numpy(images))
    _dataset(Storage.from_url(str(tmp_path / "partial")), planned=2, written=1)  # still being written
    with pytest.raises(ValueError, match=r"not complete \(1 of its shards"):
        dataset_images(tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match="no dataset here"):
        dataset_images(tmp_path / "empty")
