"""Fake-quant primitives against hand-computed values and a hand-written formula."""

from __future__ import annotations

import pytest
import torch

from intraq_core.quant import ActFakeQuant, WeightFakeQuant, affine_qparams, symmetric_qparams
from intraq_core.quant.quantizer import lp_search, lsq_fake_quant


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def frozen_act(lo: float, hi: float, bits: int) -> ActFakeQuant:
    """An activation quantizer whose corrected range is exactly [lo, hi] (one calibration step)."""
    q = ActFakeQuant(bits, ema_decay=0.5)
    q(t(lo, hi))
    q.mode = "frozen"
    return q


def reference_fake_quant(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """The design's formula written out by hand, in float64."""
    x = x.double()
    qmax = 2**bits - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    delta = max(hi - lo, 1e-8) / qmax
    zp = min(max(round(-lo / delta), 0), qmax)
    return ((torch.clamp(torch.round(x / delta) + zp, 0, qmax) - zp) * delta).float()


# ---------------------------------------------------------------- per-tensor, hand-computed


@pytest.mark.parametrize(
    ("bits", "lo", "hi", "x", "expected"),
    [
        # Δ = 3/3 = 1, zp = 1.
        (2, -1.0, 2.0, t(-1.0, -0.2, 0.0, 0.37, 2.0), t(-1.0, 0.0, 0.0, 0.0, 2.0)),
        # Range without 0 is extended: [0.5, 2] -> [0, 2], Δ = 2/3, zp = 0.
        (2, 0.5, 2.0, t(0.5, 0.9, 1.9, -0.4), t(2 / 3, 2 / 3, 2.0, 0.0)),
        # All-negative range: [-3, -1] -> [-3, 0], Δ = 1, zp = 3; above 0 clamps to 0.
        (2, -3.0, -1.0, t(-3.0, -1.4, -0.2, 0.8, -5.0), t(-3.0, -1.0, 0.0, 0.0, -3.0)),
        # Δ = 7/7 = 1, zp = 0; ties round to even (2.5 -> 2, 3.5 -> 4); 9 clamps to 7.
        (3, 0.0, 7.0, t(0.0, 0.49, 0.51, 2.5, 3.5, 6.8, 9.0), t(0.0, 0.0, 1.0, 2.0, 4.0, 7.0, 7.0)),
        # Δ = 1.5/15 = 0.1, zp = 5: -0.26 -> -3+5 = 2 -> -0.3; 1.2 -> 17 -> 15 -> 1.0; -0.7 -> 0 -> -0.5.
        (
            4,
            -0.5,
            1.0,
            t(-0.5, -0.26, 0.0, 0.33, 1.0, 1.2, -0.7),
            t(-0.5, -0.3, 0.0, 0.3, 1.0, 1.0, -0.5),
        ),
        # Δ = 2.55/255 = 0.01, zp = 0.
        (8, 0.0, 2.55, t(0.004, 0.006, 1.234, 3.0), t(0.0, 0.01, 1.23, 2.55)),
        # Δ = 2.55/255 = 0.01, zp = 128: -1.3 clamps to (0-128)·0.01 = -1.28.
        (8, -1.28, 1.27, t(-1.3, -0.004, 0.016, 1.5), t(-1.28, 0.0, 0.02, 1.27)),
    ],
)
def test_per_tensor_hand_cases(bits, lo, hi, x, expected):
    q = frozen_act(lo, hi, bits)
    torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(reference_fake_quant(x, lo, hi, bits), expected, rtol=0, atol=1e-6)


def test_affine_qparams_hand():
    scale, zp = affine_qparams(t(-1.0, 0.5, -3.0, -0.5), t(2.0, 2.0, -1.0, 1.0), 2)
    torch.testing.assert_close(scale, t(1.0, 2 / 3, 1.0, 0.5))
    assert zp.dtype == torch.int32
    assert zp.tolist() == [1, 0, 3, 1]
    # Constant-zero range: Δ = eps / (2^k - 1) stays positive.
    scale, zp = affine_qparams(t(0.0), t(0.0), 4)
    assert float(scale) == pytest.approx(1e-8 / 15) and int(zp) == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_per_tensor_matches_formula(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(4096, generator=gen) * 3
    lo, hi = -1.7, 2.3
    q = frozen_act(lo, hi, bits)
    torch.testing.assert_close(q(x), reference_fake_quant(x, lo, hi, bits), rtol=0, atol=1e-5)
    assert q(x).unique().numel() <= 2**bits


# ---------------------------------------------------------------- weights


W = [[-1.0, 0.37, 2.0], [0.6, 1.7, 3.0], [-0.2, 0.13, 0.4]]


def test_per_channel_weights_hand():
    # ch0 [-1, 2]: Δ=1, zp=1. ch1 all positive -> [0, 3]: Δ=1, zp=0. ch2 [-0.2, 0.4]: Δ=0.2, zp=1.
    w = torch.tensor(W)
    wq = WeightFakeQuant(2)
    expected = torch.tensor([[-1.0, 0.0, 2.0], [1.0, 2.0, 3.0], [-0.2, 0.2, 0.4]])
    torch.testing.assert_close(wq(w), expected, rtol=0, atol=1e-6)
    scale, zp, qmin, qmax = wq.qparams(w)
    torch.testing.assert_close(scale, t(1.0, 1.0, 0.2))
    assert zp.tolist() == [1, 0, 1] and (qmin, qmax) == (0, 3)
    # Same values as a conv weight [out=3, in=1, 1, 3]: axis 0 is the output channel.
    torch.testing.assert_close(wq(w.view(3, 1, 1, 3)), expected.view(3, 1, 1, 3), rtol=0, atol=1e-6)


def test_per_channel_matches_formula():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, 3, 3, generator=gen)
    w[3] = w[3].abs() + 0.1  # an all-positive channel
    for bits in (2, 3, 4, 8):
        out = WeightFakeQuant(bits)(w)
        for c in range(8):
            ref = reference_fake_quant(w[c], float(w[c].min()), float(w[c].max()), bits)
            torch.testing.assert_close(out[c], ref, rtol=0, atol=1e-5)


def test_symmetric_weights_hand():
    # 3 bits: levels -3..3. ch0 Δ = 2/3: -0.9 -> -1.35 -> -1; 0.37 -> 0.555 -> 1; 2 -> 3.
    # ch1 Δ = 1. ch2 all zero: Δ = eps/3, stays zero.
    w = torch.tensor([[-0.9, 0.37, 2.0], [0.6, 1.7, 3.0], [0.0, 0.0, 0.0]])
    wq = WeightFakeQuant(3, symmetric=True)
    expected = torch.tensor([[-2 / 3, 2 / 3, 2.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(wq(w), expected, rtol=0, atol=1e-6)
    scale, zp, qmin, qmax = wq.qparams(w)
    torch.testing.assert_close(scale, t(2 / 3, 1.0, 1e-8 / 3))
    assert zp.tolist() == [0, 0, 0] and (qmin, qmax) == (-3, 3)
    # 2 bits: levels -1, 0, 1 only.
    out = WeightFakeQuant(2, symmetric=True)(torch.randn(4, 50))
    assert all(row.unique().numel() <= 3 for row in out)
    scale, _ = symmetric_qparams(t(2.0, 0.0), 2)
    torch.testing.assert_close(scale, t(2.0, 1e-8))


def test_weight_ste_gradient_is_identity():
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    (WeightFakeQuant(3)(w) * 2).sum().backward()
    torch.testing.assert_close(w.grad, torch.full_like(w, 2.0))


def test_weight_quant_keeps_dtype_and_layout():
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    out = WeightFakeQuant(4)(w)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, WeightFakeQuant(4)(w.contiguous()))
    assert WeightFakeQuant(4)(w.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [1, 9, 2.0, True])
def test_bits_validated(bits):
    with pytest.raises(ValueError, match="bits"):
        WeightFakeQuant(bits)
    with pytest.raises(ValueError, match="bits"):
        ActFakeQuant(bits)


# ---------------------------------------------------------------- activation EMA and modes


def test_act_ste_gradient_masked_outside_range():
    q = frozen_act(0.0, 1.0, 4)
    x = t(-0.5, 0.2, 0.7, 1.5).requires_grad_()
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_ema_constant_input_is_exact_from_first_update():
    q = ActFakeQuant(4, ema_decay=0.9)
    x = t(-0.75, 0.1, 3.0)
    for step in range(1, 6):
        q(x)
        lo, hi = q.range()
        torch.testing.assert_close(lo, torch.tensor(-0.75), rtol=1e-6, atol=0)
        torch.testing.assert_close(hi, torch.tensor(3.0), rtol=1e-6, atol=0)
        # The stored EMA is the uncorrected one: m_t = v·(1 - 0.9^t).
        assert float(q.ema_max) == pytest.approx(3.0 * (1 - 0.9**step), rel=1e-6)
        assert int(q.num_updates) == step


def test_ema_three_updates_by_hand():
    # β = 0.5, batch (min, max) = (-1, 2), (-3, 4), (0, 8):
    # max: m = 1, 2.5, 5.25 -> corrected 1/0.5 = 2, 2.5/0.75 = 3.333, 5.25/0.875 = 6
    # min: m = -0.5, -1.75, -0.875 -> corrected -1, -2.333, -1
    q = ActFakeQuant(3, ema_decay=0.5)
    batches = [t(-1.0, 0.5, 2.0), t(-3.0, 4.0), t(0.0, 8.0, 2.4, 4.6)]
    expected = [(-1.0, 2.0), (-7 / 3, 10 / 3), (-1.0, 6.0)]
    for batch, (lo, hi) in zip(batches, expected, strict=True):
        out = q(batch)
        a, b = q.range()
        assert (float(a), float(b)) == pytest.approx((lo, hi), rel=1e-6)
    torch.testing.assert_close(q.ema_max, torch.tensor(5.25))
    torch.testing.assert_close(q.ema_min, torch.tensor(-0.875))
    # The last batch is quantized with the corrected range [-1, 6]: Δ = 7/7 = 1, zp = 1.
    torch.testing.assert_close(out, t(0.0, 6.0, 2.0, 5.0))


def test_ema_default_decay_by_hand():
    # β = 0.9, max 1, 2, 4 (min 0): m = 0.1, 0.29, 0.661 -> 1, 0.29/0.19, 0.661/0.271.
    q = ActFakeQuant(8)
    for v, expected in [(1.0, 1.0), (2.0, 0.29 / 0.19), (4.0, 0.661 / 0.271)]:
        q(t(0.0, v))
        assert float(q.range()[1]) == pytest.approx(expected, rel=1e-6)
        assert float(q.range()[0]) == 0.0


def test_frozen_mode_keeps_range():
    q = frozen_act(0.0, 3.0, 2)  # Δ = 1, zp = 0
    before = {k: v.clone() for k, v in q.state_dict().items()}
    out = q(t(-1.0, 0.4, 1.6, 2.5, 10.0))
    torch.testing.assert_close(out, t(0.0, 0.0, 2.0, 2.0, 3.0))
    for key, value in q.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dynamic_mode_uses_batch_range_and_keeps_ema():
    q = frozen_act(0.0, 100.0, 2)
    q.mode = "dynamic"
    torch.testing.assert_close(q(t(-1.0, -0.2, 0.0, 0.37, 2.0)), t(-1.0, 0.0, 0.0, 0.0, 2.0))
    torch.testing.assert_close(q(t(0.0, 1.2, 3.0)), t(0.0, 1.0, 3.0))
    assert float(q.range()[1]) == pytest.approx(100.0) and int(q.num_updates) == 1
    # Works before any calibration too.
    assert ActFakeQuant(2, mode="dynamic")(t(0.0, 3.0)).tolist() == [0.0, 3.0]


def test_off_mode_is_identity():
    q = ActFakeQuant(2, mode="off")
    x = torch.randn(5)
    assert q(x) is x
    assert int(q.num_updates) == 0


def test_freezing_uncalibrated_is_an_error():
    q = ActFakeQuant(4)
    with pytest.raises(RuntimeError, match="never calibrated"):
        q.mode = "frozen"
    with pytest.raises(RuntimeError, match="never calibrated"):
        ActFakeQuant(4, mode="frozen")
    with pytest.raises(RuntimeError, match="calibrated range"):
        q.range()
    with pytest.raises(ValueError, match="unknown"):
        q.mode = "fixed"


def test_reset_forgets_range():
    q = frozen_act(0.0, 1.0, 4)
    q.reset()
    assert q.mode == "calibrate" and not q.calibrated and int(q.num_updates) == 0
    q(t(0.0, 5.0))
    assert float(q.range()[1]) == pytest.approx(5.0)


def test_state_dict_restores_mode_and_range():
    q = frozen_act(-1.0, 2.0, 4)
    state = q.state_dict()
    assert set(state) == {"ema_min", "ema_max", "num_updates", "mode_code"}
    fresh = ActFakeQuant(4, ema_decay=0.5)
    assert fresh.mode == "calibrate"
    fresh.load_state_dict(state)
    assert fresh.mode == "frozen" and fresh.calibrated
    x = torch.randn(100)
    torch.testing.assert_close(fresh(x), q(x))
    scale, zp = fresh.qparams()
    assert float(scale) == pytest.approx(0.2) and int(zp) == 5


# ---------------------------------------------------------------- Lp range search


def test_lp_search_hand_case():
    # 2 bits (qmax 3), p = 2, factors 1, 2/3, 1/3 of the range [0, 3]:
    #   f = 1:   Δ = 1,   0.5 -> 0 (ties to even): 9 · 0.25 = 2.25 -> mean 0.225
    #   f = 2/3: Δ = 2/3, 0.5 -> 2/3 (err 1/36 each), 3 -> 2 (err 1) -> (0.25 + 1)/10 = 0.125
    #   f = 1/3: Δ = 1/3, 0.5 -> 2/3, 3 -> 1 (err 4) -> 0.425
    x = t(*([0.5] * 9), 3.0)
    lo, hi = lp_search(x, 2, p=2.0, grid=3)
    assert float(lo) == 0.0 and float(hi) == pytest.approx(2.0)


def test_lp_search_per_row_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 200, generator=gen) * torch.tensor([[0.1], [1.0], [3.0], [0.5], [2.0]])
    x[2, 0] = 12.0  # an outlier
    lo, hi = lp_search(x, 4, p=2.4, grid=50)
    for c in range(5):
        best = None
        for k in range(50, 0, -1):
            a, b = float(x[c].min()) * k / 50, float(x[c].max()) * k / 50
            err = (x[c].double() - reference_fake_quant(x[c], a, b, 4).double()).abs().pow(2.4).mean().item()
            if best is None or err < best[0] - 1e-12:
                best = (err, a, b)
        assert float(lo[c]) == pytest.approx(best[1], rel=1e-5) and float(hi[c]) == pytest.approx(best[2], rel=1e-5)
        assert float(hi[c]) < float(x[c].max())  # at 4 bits some clipping always pays for Gaussian rows


def test_lp_weight_quantizer_stores_the_searched_range():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(6, 3, 3, 3, generator=gen)
    wq = WeightFakeQuant(3, range_method="lp", channels=6)
    out = wq(w)
    lo, hi = lp_search(w.reshape(6, -1), 3)
    for c in range(6):
        torch.testing.assert_close(out[c], reference_fake_quant(w[c], float(lo[c]), float(hi[c]), 3), rtol=0, atol=1e-5)
    # The range is stored: it no longer follows the weight.
    torch.testing.assert_close(wq(w * 10), wq(torch.clamp(w * 10, -100, 100)))
    scale_before = wq.scale.clone()
    wq(w * 10)
    torch.testing.assert_close(wq.scale, scale_before)
    assert set(wq.state_dict()) == {"scale", "zero_point", "initialized"}
    with pytest.raises(ValueError, match="channels"):
        WeightFakeQuant(3, range_method="lp")


def test_lp_activation_range_from_calibration_samples():
    gen = torch.Generator().manual_seed(5)
    x = torch.relu(torch.randn(4, 8, 6, 6, generator=gen))
    x[0, 0, 0, 0] = 30.0
    q = ActFakeQuant(4, range_method="lp", signed=False)
    q(x)
    q.mode = "frozen"
    _, hi = lp_search(x.reshape(-1), 4)
    a, b = q.range()
    assert float(a) == 0.0 and float(b) == pytest.approx(float(hi), rel=1e-5) and float(b) < 30.0
    torch.testing.assert_close(q(x), reference_fake_quant(x, 0.0, float(hi), 4), rtol=0, atol=1e-5)
    state = q.state_dict()
    fresh = ActFakeQuant(4, range_method="lp", signed=False)
    fresh.load_state_dict(state)
    assert fresh.mode == "frozen"
    torch.testing.assert_close(fresh(x), q(x))


# ---------------------------------------------------------------- LSQ


def test_lsq_gradient_by_hand():
    # Δ = 0.5, zp = 0, 2 bits: x/Δ = -0.6, 0.4, 1.4, 4.0 -> clamp [0, 3] -> round 0, 0, 1, 3.
    # ∂x̂/∂Δ: below the range qmin-zp = 0; inside round(v)-v = -0.4, -0.4; above qmax-zp = 3.
    x = t(-0.3, 0.2, 0.7, 2.0).requires_grad_()
    scale = torch.tensor(0.5, requires_grad=True)
    out = lsq_fake_quant(x, scale, torch.tensor(0.0), 0, 3, grad_factor=1.0)
    torch.testing.assert_close(out.detach(), t(0.0, 0.0, 0.5, 1.5))
    out.sum().backward()
    assert float(scale.grad) == pytest.approx(0.0 - 0.4 - 0.4 + 3.0)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    # The gradient factor scales only the step size's gradient.
    scale2 = torch.tensor(0.5, requires_grad=True)
    lsq_fake_quant(t(-0.3, 0.2, 0.7, 2.0), scale2, torch.tensor(0.0), 0, 3, grad_factor=0.25).sum().backward()
    assert float(scale2.grad) == pytest.approx(2.2 * 0.25)


def test_lsq_forward_equals_fused_fake_quant():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1000, generator=gen) * 2
    scale, zp = torch.tensor(0.3), torch.tensor(5.0)
    fused = torch.fake_quantize_per_tensor_affine(x, 0.3, 5, 0, 15)
    torch.testing.assert_close(lsq_fake_quant(x, scale, zp, 0, 15, 1.0), fused, rtol=0, atol=1e-6)


def test_learned_activation_step_size_trains_and_round_trips():
    q = ActFakeQuant(3, learn_scale=True, signed=False)
    x = torch.relu(torch.randn(16, 4, 5, 5, generator=torch.Generator().manual_seed(7)))
    q(x)
    q.mode = "frozen"
    assert isinstance(q.scale, torch.nn.Parameter)
    assert float(q.scale.detach()) == pytest.approx(float(x.max()) / 7, rel=1e-5)  # min/max init
    ((q(x) - x) ** 2).sum().backward()
    assert q.scale.grad is not None and float(q.scale.grad) != 0.0
    # Without grad the fused op gives the same values as the LSQ path.
    with torch.no_grad():
        torch.testing.assert_close(q(x), lsq_fake_quant(x, q.scale, q.zero_point, 0, 7, 1.0))
    fresh = ActFakeQuant(3, learn_scale=True, signed=False)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh.scale.detach(), q.scale.detach())


def test_learned_weight_step_size_per_channel():
    w = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(8), requires_grad=True)
    wq = WeightFakeQuant(4, learn_scale=True, channels=4)
    out = wq(w)
    torch.testing.assert_close(out.detach(), WeightFakeQuant(4)(w.detach()), rtol=0, atol=1e-6)  # min/max init
    out.pow(2).sum().backward()
    assert wq.scale.grad.shape == (4,) and bool((wq.scale.grad != 0).all())
    assert w.grad is not None


# ---------------------------------------------------------------- AdaRound and QDrop


def test_adaround_harden_by_hand():
    w = torch.nn.Parameter(t(0.26, 0.74, 1.1).view(1, 3))
    wq = WeightFakeQuant(2, learn_scale=False, range_method="lp", channels=1)
    wq.scale.fill_(0.5)
    wq.zero_point.fill_(0.0)
    wq.initialized.fill_(True)
    wq.start_adaround(w)
    # Initialized at the fractional part: the soft-rounded weight equals w (inside the grid).
    torch.testing.assert_close(wq(w), w.detach(), rtol=0, atol=1e-4)
    with torch.no_grad():
        wq.alpha.copy_(t(1.0, -1.0, 1.0).view(1, 3))  # up, down, up
    wq.harden(w)
    # floor(w/Δ) = 0, 1, 2 -> 1, 1, 3 -> 0.5, 0.5, 1.5 (nearest rounding would give 0.5, 1.0, 1.0)
    torch.testing.assert_close(w.detach(), t(0.5, 0.5, 1.5).view(1, 3))
    assert wq.alpha is None
    torch.testing.assert_close(wq(w), w.detach())


def test_adaround_regularizer_by_hand():
    w = torch.nn.Parameter(t(0.3, 0.7).view(1, 2))
    wq = WeightFakeQuant(4, range_method="lp", channels=1)
    wq(w)
    wq.start_adaround(w)
    with torch.no_grad():
        wq.alpha.zero_()  # σ(0) = 0.5 -> h = 0.5·1.2 - 0.1 = 0.5 -> 1 - |0|^β = 1 each
    assert float(wq.rounding_regularizer(2.0)) == pytest.approx(2.0)
    with torch.no_grad():
        wq.alpha.fill_(10.0)  # h = 1 -> 1 - 1 = 0
    assert float(wq.rounding_regularizer(2.0)) == pytest.approx(0.0, abs=1e-6)


def test_qdrop_keeps_elements_unquantized():
    q = frozen_act(0.0, 3.0, 2)
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(9)) * 3
    quantized = q(x)
    q.drop_prob = 1.0
    torch.testing.assert_close(q(x), x)
    q.drop_prob = 0.5
    torch.manual_seed(0)
    out = q(x)
    kept = (out == x) & (quantized != x)
    assert 0.45 < float(kept.float().sum() / (quantized != x).float().sum()) < 0.55
    q.drop_prob = 0.0
    torch.testing.assert_close(q(x), quantized)


def test_unsigned_grid_by_hand():
    # Range [0, 3] at 2 bits: Δ = 1, zero point 0 — a negative input clamps to 0 on the unsigned grid,
    # while the signed (asymmetric) grid of the same observed values [-1, 3] has Δ = 4/3, zp = 1.
    x = torch.tensor([-1.0, 0.4, 1.6, 3.0])
    unsigned = ActFakeQuant(2, mode="dynamic", signed=False)
    torch.testing.assert_close(unsigned(x), torch.tensor([0.0, 0.0, 2.0, 3.0]))
    signed = ActFakeQuant(2, mode="dynamic", signed=True)
    d = 4.0 / 3.0
    torch.testing.assert_close(signed(x), torch.tensor([-d, 0.0, d, 2 * d]))
    calibrated = ActFakeQuant(2, ema_decay=0.5, signed=False)
    calibrated(x)  # EMA range (-1, 3): the unsigned grid still starts at 0
    scale, zero_point = calibrated.qparams()
    assert float(scale) == 1.0 and int(zero_point) == 0


# ---------------------------------------------------------------- per-channel activations


def test_per_channel_activation_hand_case():
    """Two channels, 2 bits: each gets its own range, step and zero point.

    Channel 0 sees [0, 3]: Δ = 1, zp = 0. Channel 1 sees [-0.2, 0.1]: Δ = 0.1, zp = 2. A per-tensor
    grid ([-0.2, 3], Δ = 1.0667) would put channel 1 entirely on the zero level."""
    x = torch.tensor([[[0.0, 3.0], [-0.2, 0.1]], [[1.4, 2.6], [0.04, -0.06]]])  # [N=2, C=2, 2]
    q = ActFakeQuant(2, ema_decay=0.5, channels=2)
    q(x[:1])  # calibrate on the first sample: the corrected range is its min/max per channel
    q.mode = "frozen"
    lo, hi = q.range()
    torch.testing.assert_close(lo, t(0.0, -0.2))
    torch.testing.assert_close(hi, t(3.0, 0.1))
    scale, zp = q.qparams()
    torch.testing.assert_close(scale, t(1.0, 0.1))
    assert zp.tolist() == [0, 2]
    # 1.4 -> 1, 2.6 -> 3; 0.04/0.1 = 0.4 -> 0, -0.06/0.1 = -0.6 -> -1 (code 1)
    expected = torch.tensor([[[0.0, 3.0], [-0.2, 0.1]], [[1.0, 3.0], [0.0, -0.1]]])
    torch.testing.assert_close(q(x), expected)
    per_tensor = ActFakeQuant(2, ema_decay=0.5)
    per_tensor(x[:1])
    per_tensor.mode = "frozen"
    assert per_tensor(x)[:, 1].abs().max() == 0.0  # the small channel vanishes on a shared grid
    with pytest.raises(ValueError, match="2 channels got a tensor of shape"):
        q(torch.zeros(2, 3, 2))


def test_per_channel_activation_lp_learned_and_state_dict():
    """Lp ranges are searched per channel; LSQ steps are per channel; the state dict round-trips."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(8, 3, 5, 5, generator=gen) * torch.tensor([0.1, 1.0, 10.0]).view(1, 3, 1, 1)
    x[0, 2, 0, 0] = 80.0
    q = ActFakeQuant(4, range_method="lp", learn_scale=True, channels=3)
    q(x)
    q.mode = "frozen"
    rows = x.transpose(0, 1).reshape(3, -1)
    lo, hi = lp_search(rows, 4, start=(rows.amin(1), rows.amax(1)))
    scale, _ = affine_qparams(lo, hi, 4)
    torch.testing.assert_close(q.scale.detach(), scale)
    assert float(q.range()[1][2]) < 80.0  # the outlier is clipped on its own channel only
    ((q(x) - x) ** 2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.shape == (3,) and bool((q.scale.grad != 0).all())
    fresh = ActFakeQuant(4, range_method="lp", learn_scale=True, channels=3)
    fresh.load_state_dict(q.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), q(x))
