"""Each synthesis loss against a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from intraq_core.synth import losses


def test_bns_loss_hand_case() -> None:
    # Layer 1: means (1, 2) vs running (0, 0) -> mean_c of squares = (1 + 4) / 2 = 2.5
    # Layer 2: mean (0) vs running (1) -> 1.0; average over layers = 1.75.
    # Variances: layer 1 (1, 1) vs (1, 3) -> (0 + 4) / 2 = 2; layer 2 (2) vs (1) -> 1; average 1.5.
    means = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]
    running_means = [torch.zeros(2), torch.ones(1)]
    variances = [torch.tensor([1.0, 1.0]), torch.tensor([2.0])]
    running_vars = [torch.tensor([1.0, 3.0]), torch.tensor([1.0])]
    m, v = losses.bns_loss(means, variances, running_means, running_vars)
    assert_close(m, torch.tensor(1.75))
    assert_close(v, torch.tensor(1.5))


def test_bns_loss_needs_layers() -> None:
    with pytest.raises(ValueError):
        losses.bns_loss([], [], [], [])


def test_sil_loss_hand_case() -> None:
    # Image 1: logits (0, 0) -> p = 0.5, target 0.9 -> 0.16.
    # Image 2: logits (ln 3, 0) -> p = 0.75, target 1.0 -> 0.0625. Mean 0.11125.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    labels = torch.tensor([0, 0])
    targets = torch.tensor([0.9, 1.0])
    assert_close(losses.sil_loss(logits, labels, targets), torch.tensor(0.11125))


def test_sil_loss_only_penalizes_target_class() -> None:
    # Moving mass among non-target classes leaves the loss unchanged.
    a = torch.tensor([[2.0, 1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0, 1.0]])
    t = torch.tensor([0.9])
    y = torch.tensor([0])
    assert_close(losses.sil_loss(a, y, t), losses.sil_loss(b, y, t))


def test_sil_targets_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    t = losses.sil_targets(10_000, 0.95, 0.5, gen)
    soft = t < 1.0
    assert 0.47 < soft.float().mean() < 0.53
    assert t.min() >= 0.95 and t.max() <= 1.0
    assert torch.all(losses.sil_targets(100, 0.6, 0.0, gen) == 1.0)


def test_mdc_loss_hand_case() -> None:
    # Class 0 centre (1, 1). f1 = (1, 0): d = 1 - 1/sqrt(2) = 0.29289; f2 = (1, 1): d = 0.
    # Class 1 has no centre: f3 is masked out. lower = 0.05, upper = 0.2.
    # lower part = (0 + 0.05) / 2, upper part = (0.09289 + 0) / 2.
    feats = torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, -3.0]])
    labels = torch.tensor([0, 0, 1])
    centres = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    has = torch.tensor([True, False])
    low, up = losses.mdc_loss(feats, labels, centres, has, 0.05, 0.2)
    d1 = 1.0 - 1.0 / math.sqrt(2.0)
    assert_close(low, torch.tensor(0.05 / (2 + 1e-6)))
    assert_close(up, torch.tensor((d1 - 0.2) / (2 + 1e-6)))


def test_mdc_loss_inactive_without_centres() -> None:
    feats = torch.randn(4, 3, requires_grad=True)
    low, up = losses.mdc_loss(
        feats, torch.zeros(4, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool), 0.1, 0.5
    )
    assert low.item() == 0.0 and up.item() == 0.0
    (low + up).backward()  # still differentiable
    assert feats.grad is not None


def test_adi_loss_hand_case() -> None:
    # Temperature 1: student p = (0.8, 0.2), teacher q = (0.5, 0.5), mixture m = (0.65, 0.35).
    # JS as in DeepInversion = 0.5 KL(m || p) + 0.5 KL(m || q); loss = 1 - JS.
    s_logits = torch.tensor([[math.log(0.8), math.log(0.2)]])
    t_logits = torch.tensor([[0.0, 0.0]])
    kl_mp = 0.65 * math.log(0.65 / 0.8) + 0.35 * math.log(0.35 / 0.2)
    kl_mq = 0.65 * math.log(0.65 / 0.5) + 0.35 * math.log(0.35 / 0.5)
    expected = 1.0 - 0.5 * (kl_mp + kl_mq)
    assert_close(losses.adi_loss(t_logits, s_logits, temperature=1.0), torch.tensor(expected))
    # Identical distributions: JS = 0, loss = 1.
    assert_close(losses.adi_loss(t_logits, t_logits), torch.tensor(1.0))


def test_ce_loss_matches_hand_value() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0]])
    assert_close(losses.ce_loss(logits, torch.tensor([0])), torch.tensor(-math.log(0.75)))


def test_intra_class_distance_hand_case() -> None:
    # Class 0: a=(1,0), b=(0,1), c=(1,0): cos(a,b)=0, cos(a,c)=1, cos(b,c)=0 -> mean 1/3 -> 2/3.
    # Class 1: (2,0), (3,0): identical direction -> 0. Mean over classes = 1/3.
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert losses.mean_intra_class_cosine_distance(feats, labels) == pytest.approx(1.0 / 3.0, abs=1e-6)


def test_distance_to_centre_hand_case() -> None:
    # Class 0: (1,0) and (0,1), centre (0.5,0.5): each cos = 1/sqrt(2) -> d = 1 - 1/sqrt(2).
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    assert losses.mean_distance_to_class_centre(feats, labels) == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
