"""LOR: batched crops equal the reference per-image loop; the sampling law is torchvision's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from intraq_core.synth.lor import LorParams, apply_lor, reference_lor, rotate_batch, sample_lor_params


def test_batched_equals_reference_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    params = sample_lor_params(64, 32, 32, min_area=0.5, generator=gen)
    assert_close(apply_lor(x, params), reference_lor(x, params), atol=1e-5, rtol=1e-5)


def test_batched_equals_reference_non_square_small_area() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 20, 30)
    params = sample_lor_params(16, 20, 30, min_area=0.08, generator=gen)
    assert_close(apply_lor(x, params), reference_lor(x, params), atol=1e-5, rtol=1e-5)


def test_hand_crop_and_flip() -> None:
    # A 2x2 crop at (1, 1) of a 4x4 ramp, upsampled to 4x4 and flipped, equals interpolate by hand.
    x = torch.arange(16.0).view(1, 1, 4, 4)
    p = LorParams(
        torch.tensor([1]),
        torch.tensor([1]),
        torch.tensor([2]),
        torch.tensor([2]),
        torch.tensor([True]),
        torch.zeros(1),
    )
    crop = x[:, :, 1:3, 1:3]
    expected = F.interpolate(crop, size=(4, 4), mode="bilinear", align_corners=False).flip(3)
    assert_close(apply_lor(x, p), expected)
    # Corner values: clamping keeps the crop's own corner pixels (no blending with outside pixels).
    out = apply_lor(x, p)[0, 0]
    assert out[0, -1].item() == 5.0 and out[-1, 0].item() == 10.0


def test_full_crop_without_flip_is_identity() -> None:
    x = torch.randn(3, 3, 8, 8)
    n = 3
    p = LorParams(
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
        torch.full((n,), 8),
        torch.full((n,), 8),
        torch.zeros(n, dtype=torch.bool),
        torch.zeros(n),
    )
    assert_close(apply_lor(x, p), x)


def test_gradients_reach_only_cropped_pixels() -> None:
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    p = LorParams(
        torch.tensor([0]),
        torch.tensor([0]),
        torch.tensor([4]),
        torch.tensor([4]),
        torch.tensor([False]),
        torch.zeros(1),
    )
    apply_lor(x, p).sum().backward()
    assert x.grad[0, 0, :4, :4].abs().sum() > 0
    assert x.grad[0, 0, 4:, :].abs().sum() == 0 and x.grad[0, 0, :, 4:].abs().sum() == 0


def test_sampling_law() -> None:
    gen = torch.Generator().manual_seed(2)
    p = sample_lor_params(20_000, 32, 32, min_area=0.5, generator=gen)
    area = (p.height * p.width).float() / 1024
    ratio = p.width.float() / p.height.float()
    assert area.min() >= 0.45 and area.max() <= 1.0
    assert ratio.min() > 0.7 and ratio.max() < 1.45
    assert torch.all(p.top + p.height <= 32) and torch.all(p.left + p.width <= 32)
    assert torch.all(p.top >= 0) and torch.all(p.left >= 0)
    assert 0.48 < p.flip.float().mean() < 0.52
    no_flip = sample_lor_params(100, 32, 32, min_area=0.5, generator=gen, flip=False)
    assert not no_flip.flip.any()


def test_same_generator_state_same_params() -> None:
    a = sample_lor_params(8, 32, 32, min_area=0.5, generator=torch.Generator().manual_seed(5))
    b = sample_lor_params(8, 32, 32, min_area=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.top, b.top) and torch.equal(a.width, b.width) and torch.equal(a.flip, b.flip)


def test_rotation_by_90_degrees() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = rotate_batch(x, torch.tensor([90.0]))
    # +90 degrees (counter-clockwise in image coordinates) equals torch.rot90 with k=1.
    assert_close(out, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-4, rtol=0)
    # Rotating by +90 then -90 returns the image (bilinear is exact at 90-degree multiples).
    back = rotate_batch(out, torch.tensor([-90.0]))
    assert_close(back, x, atol=1e-4, rtol=0)
