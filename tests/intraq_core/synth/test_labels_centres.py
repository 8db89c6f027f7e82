"""Label plans and class centres."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from intraq_core.synth.centres import ClassCentres
from intraq_core.synth.labels import label_plan


def test_balanced_plan_is_balanced_in_every_batch() -> None:
    y = label_plan(1024, 10, "balanced")
    counts = torch.bincount(y, minlength=10)
    assert counts.max() - counts.min() <= 1
    batch = torch.bincount(y[:256], minlength=10)
    assert batch.max() - batch.min() <= 1


def test_uniform_plan_is_seeded() -> None:
    a = label_plan(500, 10, "uniform", seed=3)
    b = label_plan(500, 10, "uniform", seed=3)
    c = label_plan(500, 10, "uniform", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) == set(range(10))


def test_fewer_images_than_classes_draws_classes_without_replacement() -> None:
    # Seed 0: torch.randperm(10) from derive_seed(0, PURPOSE_LABELS) is [6, 9, 4, 5, 7, 1, 2, 8, 3, 0];
    # its first four classes, ascending, are the plan.
    assert label_plan(4, 10, seed=0).tolist() == [4, 5, 6, 9]
    assert label_plan(4, 10, seed=0).tolist() == [4, 5, 6, 9]  # deterministic
    assert label_plan(4, 10, seed=1).tolist() == [1, 5, 6, 8]  # seeded
    for n in (1, 7, 9):
        y = label_plan(n, 10, seed=3)
        assert len(set(y.tolist())) == n and y.min() >= 0 and y.max() < 10  # each class at most once
    # 256 images of a 1,000-class teacher (the IntraQ paper's ImageNet budget): 256 distinct classes.
    y = label_plan(256, 1000, seed=0)
    assert len(set(y.tolist())) == 256 and y.max() < 1000


def test_balanced_plan_with_enough_images_is_unchanged() -> None:
    assert label_plan(12, 10, seed=5).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert label_plan(10, 10, seed=5).tolist() == list(range(10))


def test_plan_rejects_no_images_or_unknown_mode() -> None:
    with pytest.raises(ValueError, match="needs images and classes"):
        label_plan(0, 10)
    with pytest.raises(ValueError, match="unknown label plan"):
        label_plan(5, 10, "shuffled")  # type: ignore[arg-type]


def test_centres_are_plain_means() -> None:
    store = ClassCentres(3, 2)
    store.update(torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([0, 0]))
    store.update(np.array([[4.0, 4.0]]), np.array([2]))
    centres, has = store.snapshot()
    assert_close(centres[0], torch.tensor([2.0, 1.0]))
    assert_close(centres[2], torch.tensor([4.0, 4.0]))
    assert has.tolist() == [True, False, True]


def test_centres_state_round_trip() -> None:
    store = ClassCentres(2, 3)
    store.update(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
    again = ClassCentres.from_state(store.state())
    assert_close(again.snapshot()[0], store.snapshot()[0])


def test_centres_shape_checked() -> None:
    with pytest.raises(ValueError):
        ClassCentres(2, 3).update(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
