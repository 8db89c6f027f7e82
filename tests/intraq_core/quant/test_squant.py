"""SQuant: hand-computed flips on tiny tensors, the CASE constraints, hardened weights, BN-based ranges."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from intraq_core.config import EvalConfig, ModelConfig, QuantConfig
from intraq_core.quant import WeightFakeQuant, act_quantizers, quantize, set_act_mode, squant_
from intraq_core.quant.squant import act_sigma_factor, squant_round, squant_weight


def grid(*kernels: list[float]) -> torch.Tensor:
    """One output channel whose kernels (input channels) hold the given grid positions."""
    return torch.tensor([list(kernels)], dtype=torch.float64)


def assert_int(actual: torch.Tensor, *kernels: list[int]) -> None:
    torch.testing.assert_close(actual, torch.tensor([list(kernels)], dtype=torch.float32))


# -- hand-computed flips ------------------------------------------------------------------------


def test_kernel_stage_flips_the_element_closest_to_the_midpoint():
    # Nearest: [0, 0, 0, 1], perturbations [-0.4, -0.3, -0.2, 0]: the kernel sum is -0.9, so
    # round(0.9) = 1 element rounded down goes up: the one at 0.4 (largest |p|). New sum 0.1.
    x = grid([0.4, 0.3, 0.2, 1.0])
    assert_int(squant_round(x, 0, 15, channel=False), [1, 0, 0, 1])
    # SQuant-E is round to nearest.
    assert_int(squant_round(x, 0, 15, kernel=False, channel=False), [0, 0, 0, 1])
    # The channel stage finds |0.1| <= 0.5 and changes nothing.
    assert_int(squant_round(x, 0, 15), [1, 0, 0, 1])


def test_kernel_stage_flips_round_of_the_sum_elements_downwards():
    # Perturbations +0.45, +0.4, +0.35, +0.1 (rounded up), sum 1.3 -> 1 flip down: the 0.45 one.
    x = grid([2.55, 3.6, 4.65, 5.9])
    assert_int(squant_round(x, 0, 15, channel=False), [2, 4, 5, 6])
    # Sum 1.8 -> 2 flips down, the two largest perturbations (0.45 and 0.45).
    x = grid([2.55, 3.6, 4.55, 5.9, 7.6])
    assert_int(squant_round(x, 0, 15, channel=False), [2, 4, 4, 6, 8])


def test_channel_stage_alone_works_across_the_elements_of_a_channel():
    # 1-element kernels (a Linear row): perturbations -0.4 and -0.3, channel sum -0.7 -> 1 flip up.
    x = torch.tensor([[[0.4], [1.3]]], dtype=torch.float64)
    out = squant_round(x, 0, 15)
    torch.testing.assert_close(out, torch.tensor([[[1.0], [1.0]]]))


def test_channel_stage_flips_back_the_kernel_that_over_corrected_most():
    # Kernel A: p = [-0.35, -0.3, 0] (sum -0.65) -> flips 0.35 up: p = [0.65, -0.3, 0], sum +0.35;
    #   it over-corrected, so it nominates that element to flip back (priority 0.65).
    # Kernel B: p = [-0.4, -0.3, 0] (sum -0.7) -> flips 1.4 up: sum +0.3; nominates it (0.6).
    # Channel: 0.35 + 0.3 = 0.65 -> 1 flip down among the nominees: kernel A's (0.65 > 0.6).
    x = grid([0.35, 0.3, 5.0], [1.4, 2.3, 7.0])
    assert_int(squant_round(x, 0, 15, channel=False), [1, 0, 5], [2, 2, 7])
    assert_int(squant_round(x, 0, 15), [0, 0, 5], [2, 2, 7])


def test_channel_stage_uses_the_next_element_of_kernels_that_under_corrected():
    # Kernel A: p = [-0.46, -0.44, -0.42, -0.08] (sum -1.4) -> 1 flip (0.46): sum -0.4; it
    #   under-corrected, so it nominates its next candidate, 0.44 (up).
    # Kernel B: p = [-0.48, -0.4, -0.45, -0.1] (sum -1.43) -> 1 flip (0.48): sum -0.43; nominates 0.45.
    # Channel: -0.83 -> 1 flip up among the nominees: kernel B's 0.45 (> 0.44).
    x = grid([0.46, 0.44, 0.42, 0.08], [2.48, 3.4, 4.45, 5.1])
    assert_int(squant_round(x, 0, 15, channel=False), [1, 0, 0, 0], [3, 3, 4, 5])
    assert_int(squant_round(x, 0, 15), [1, 0, 0, 0], [3, 3, 5, 5])


def test_flips_stay_inside_the_integer_range_and_respect_pins():
    # Positions above quant_max cannot go up: only the 14.2 one can take the kernel's flip.
    x = grid([15.4, 15.3, 14.2])
    assert_int(squant_round(x, 0, 15, channel=False), [15, 15, 15])
    # Pinning the element SQuant would flip moves the flip to the next one.
    x = grid([0.4, 0.3, 0.2, 1.0])
    pinned = torch.tensor([[[True, False, False, False]]])
    assert_int(squant_round(x, 0, 15, channel=False, pinned=pinned), [0, 1, 0, 1])


def test_case_constraints_hold_on_a_random_layer():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(6, 5, 9, generator=gen, dtype=torch.float64) * 13 + 1  # away from the bounds
    for kernel, channel in ((True, False), (True, True), (False, True)):
        n = squant_round(x, 0, 15, kernel=kernel, channel=channel).double()
        err = n - x
        assert err.abs().max() < 1.0 and n.min() >= 0 and n.max() <= 15
        assert torch.equal(n, n.round())
        if kernel and not channel:
            assert err.sum(dim=2).abs().max() <= 0.5 + 1e-9
        if kernel and channel:
            assert err.sum(dim=2).abs().max() <= 1.0 + 1e-9
        if channel:
            assert err.sum(dim=(1, 2)).abs().max() <= 0.5 + 1e-9
    nearest_err = x.round() - x
    assert nearest_err.sum(dim=(1, 2)).abs().max() > 0.5  # the constraint did something


# -- hardened weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (5, 7)])
def test_hardened_weight_is_a_fixed_point_of_the_weight_quantizer(symmetric, shape):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=gen) * 0.2
    quantizer = WeightFakeQuant(4, symmetric=symmetric)
    hardened, flips = squant_weight(weight, quantizer)
    assert torch.equal(quantizer(hardened), hardened)
    assert flips.flipped > 0
    # Per-channel grid unchanged: each value is within one step of the original weight.
    scale = quantizer.qparams(weight)[0].view(-1, *([1] * (weight.dim() - 1)))
    assert ((hardened - weight).abs() / scale).max() < 1.0 + 1e-4
    # SQuant-E (no flips) is what the fake quantizer does to the original weight: the same grid
    # positions; values equal up to the last bit of the scale (the min/max quantizer recomputes
    # its scale from the hardened weight, which can move it by an ulp: hardening settles that).
    nearest, flips_e = squant_weight(weight, quantizer, kernel=False, channel=False)
    assert flips_e.flipped == 0
    torch.testing.assert_close(nearest, quantizer(weight), rtol=1e-6, atol=1e-7)
    assert torch.equal(quantizer(nearest), nearest)


# -- activations ----------------------------------------------------------------------------------


class ConvBnRelu(nn.Module):
    """conv → BN (β = 1, γ = 2, unit running variance) → ReLU → pooled Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, eps=1e-12)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.weight.fill_(2.0)
            self.bn.bias.fill_(1.0)
            self.bn.running_var.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def truncated_normal_std(mu: float, sigma: float) -> float:
    """Std of N(mu, sigma²) restricted to positive values (closed form)."""
    a = -mu / sigma
    pdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    tail = 0.5 * math.erfc(a / math.sqrt(2))
    lam = pdf / tail
    return sigma * math.sqrt(1 + a * lam - lam * lam)


def test_activation_range_follows_the_bn_statistics():
    # The ReLU sees N(1, 2²) clipped at 0: σ₊ = 1.3945. At 8 bits the range is 25·σ₊; at 4 bits
    # 12·σ₊ = 16.7 is capped at the observed maximum, about 1 + 2·4.5 for these 65k samples.
    sigma_pos = truncated_normal_std(1.0, 2.0)
    assert sigma_pos == pytest.approx(1.3945, abs=1e-4)
    model = ConvBnRelu().eval()
    for bits in (8, 4):
        cfg = QuantConfig(method="squant", w_bits=bits, a_bits=bits, squant_act_images=64)
        q = quantize(model, cfg).eval()
        report = squant_(q, cfg, image_shape=(3, 16, 16), seed=0)
        (name,) = report.act_ranges
        lo, hi = report.act_ranges[name]
        assert lo == 0.0
        if bits == 8:
            assert hi == pytest.approx(act_sigma_factor(8) * sigma_pos, rel=0.02)
        else:
            assert 1 + 2 * 3.5 < hi < 1 + 2 * 6.0
        quant = act_quantizers(q)[name]
        assert quant.mode == "frozen"
        torch.testing.assert_close(torch.stack(quant.range()), torch.tensor([lo, hi]), rtol=1e-6, atol=1e-6)


def test_squant_is_deterministic_and_sets_the_input_range_from_normalization():
    model = ConvBnRelu().eval()
    cfg = QuantConfig(method="squant", quantize_input=True, squant_act_images=8)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.5)
    first = quantize(model, cfg).eval()
    r1 = squant_(first, cfg, image_shape=(3, 8, 8), normalization=(mean, std), seed=5)
    second = quantize(model, cfg).eval()
    r2 = squant_(second, cfg, image_shape=(3, 8, 8), normalization=(mean, std), seed=5)
    assert r1.act_ranges == r2.act_ranges
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    (input_name,) = [n for n in r1.act_ranges if n.endswith(".x")]
    lo, hi = r1.act_ranges[input_name]
    assert lo == pytest.approx(min((0 - m) / s for m, s in zip(mean, std, strict=True)))
    assert hi == pytest.approx(max((1 - m) / s for m, s in zip(mean, std, strict=True)))


# -- the shared teacher ---------------------------------------------------------------------------


def test_squant_on_the_shared_resnet20_beats_nearest_rounding(teacher_path):
    """W4A4 with no image: SQuant's flips bring the student closer to the teacher than nearest
    rounding (KL on real test images), and the BN-based ranges give a usable model."""
    from intraq_core.data import load_test_set
    from intraq_core.models import create_model, resolve_model_config

    model_cfg = resolve_model_config(ModelConfig(arch="cifar_resnet20", weights=str(teacher_path)))
    teacher = create_model(model_cfg).eval()
    x, y = next(iter(load_test_set(EvalConfig(data="cifar10-test", limit=1000), model_cfg).batches(1000)))
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(x), dim=1)

    def kl_and_top1(kernel: bool, channel: bool, acts: bool) -> tuple[float, float]:
        cfg = QuantConfig(method="squant", squant_kernel=kernel, squant_channel=channel, squant_act_images=64)
        student = quantize(teacher, cfg).eval()
        squant_(student, cfg, image_shape=(3, 32, 32), normalization=(model_cfg.mean, model_cfg.std))
        if not acts:
            set_act_mode(student, "off")
        with torch.no_grad():
            logits = student(x)
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits, 1), t_logp, log_target=True, reduction="batchmean")
        return float(kl), 100.0 * float((logits.argmax(1) == y).float().mean())

    kl_e, _ = kl_and_top1(False, False, acts=False)
    kl_ekc, _ = kl_and_top1(True, True, acts=False)
    assert kl_ekc < 0.8 * kl_e
    _, top1 = kl_and_top1(True, True, acts=True)
    assert top1 > 84.0
