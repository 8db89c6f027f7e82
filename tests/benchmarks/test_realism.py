"""The realism signal R (benchmarks/realism.py) against hand-computed BN statistics and pairs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.realism import bn_distance, real_check, separated_pairs, setting_of


def _one_bn(running_mean: list[float], running_var: list[float]) -> nn.Module:
    bn = nn.BatchNorm2d(len(running_mean))
    bn.running_mean.copy_(torch.tensor(running_mean))
    bn.running_var.copy_(torch.tensor(running_var))
    return nn.Sequential(bn).eval()


def test_bn_distance_of_one_batch_by_hand() -> None:
    # channel 0: values 0, 2, 0, 2 -> mean 1, biased variance 1; channel 1: all 1 -> mean 1, variance 0.
    # running (0, 1) and (1, 2): mean part mean_c of (1, 0) = 0.5; variance part mean_c of (0, 4) = 2.
    images = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 1.0], [2.0, 1.0]]).view(4, 2, 1, 1)
    r = bn_distance(_one_bn([0.0, 1.0], [1.0, 2.0]), images, batch_size=4)
    assert r["batches"] == 1 and r["images"] == 4
    torch.testing.assert_close(torch.tensor([r["mean_part"], r["var_part"], r["R"]]), torch.tensor([0.5, 2.0, 2.5]))


def test_bn_distance_uses_batch_statistics_not_running_ones() -> None:
    # In eval mode BN normalizes with its running statistics; R must read the batch's own. Images whose
    # batch statistics equal the running ones score 0, others do not, whatever BN's output is.
    model = _one_bn([1.0], [1.0])
    matched = torch.tensor([0.0, 2.0, 0.0, 2.0]).view(4, 1, 1, 1)  # mean 1, biased variance 1
    assert bn_distance(model, matched, batch_size=4)["R"] == pytest.approx(0.0, abs=1e-7)
    assert bn_distance(model, matched + 1.0, batch_size=4)["R"] == pytest.approx(1.0)
    assert model[0].running_mean.item() == 1.0  # and leaves the teacher untouched


def test_bn_distance_drops_the_partial_batch_and_is_seeded() -> None:
    images = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    model = _one_bn([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    r = bn_distance(model, images, batch_size=2)
    assert (r["batches"], r["images"]) == (2, 4)
    assert bn_distance(model, images, batch_size=2) == r
    with pytest.raises(ValueError, match="fewer than one batch"):
        bn_distance(model, images, batch_size=8)


def test_separated_pairs_by_hand() -> None:
    # A vs B: 90.5 vs 80.5, spread 0.71 -> separated, A higher; A vs C: 90.5 vs 90.4, inside 0.71 -> not separated;
    # B vs C: separated, C higher; D has one seed and is left out.
    top1 = {"A": [90.0, 91.0], "B": [80.0, 81.0], "C": [90.2, 90.6], "D": [70.0]}
    r = {"A": [1.0, 1.0], "B": [2.0, 2.2], "C": [3.0, 3.0], "D": [0.1]}
    pairs = separated_pairs(r, top1)
    assert pairs == [{"high": "A", "low": "B", "agrees": True}, {"high": "C", "low": "B", "agrees": False}]


def test_real_check_names_what_scores_below_real() -> None:
    results = [("x", {"R": 0.5}), ("y", {"R": 0.05})]
    assert "lower than all 1 synthetic" in real_check(0.1, results[:1])
    line = real_check(0.1, results)
    assert "do **not**" in line and "y (0.0500)" in line and "x (" not in line


def test_setting_of_strips_only_a_trailing_seed() -> None:
    assert setting_of("IntraQ 256 x 240, seed 1") == "IntraQ 256 x 240"
    assert setting_of("real test images (1300)") == "real test images (1300)"
