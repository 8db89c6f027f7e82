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


def test_plan_needs_one_image_per_class() -> None:
    with pytest.raises(ValueError, match="smaller than the number of classes"):
        label_plan(5, 10)


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
