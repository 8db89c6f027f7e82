"""Micro-batches (generate.micro_batch_size) optimize the same images as the whole batch.

A small BN CNN with non-trivial running statistics; batch 8 in micro-batches of 3 (3 + 3 + 2)
against the one-pass batch, with every term that couples images (BNS; MDC's denominator) and
the per-image ones (CE, SIL, MDC's hinges) active, LOR on every iteration.

Tolerances: the two paths compute the same float32 quantities in another reduction order (the
batch statistics as S1/n, S2/n - mu^2 from float64 sums of float32 micro-batch sums, instead of
one float32 mean over the batch), so they agree to a few float32 ulps (eps = 1.2e-7) of the
values summed. The gradient is compared at rtol 1e-5 / atol 1e-7 (its entries are O(1e-3));
after Adam steps, whose first moves are lr * g / |g| (insensitive to the relative error of g),
the images at rtol 1e-5 / atol 1e-6 (pixels are O(1)).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from intraq_core.config import SynthConfig
from intraq_core.synth.centres import ClassCentres
from intraq_core.synth.engine import Synthesizer, initial_noise
from intraq_core.synth.lor import sample_lor_params

SHAPE = (3, 12, 12)
LABELS = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
SEEDS = torch.arange(8) + 40


def bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def config(micro: int | None, channels_last: bool = True, **kw: object) -> SynthConfig:
    base: dict[str, object] = {
        "method": "custom",
        "bns_weight": 1.0,
        "ce_weight": 0.5,
        "sil_weight": 1.0,
        "mdc_weight": 1.0,
        "mdc_lower": 1.0,  # the lower hinge fires at once against the centres below
        "mdc_upper": 2.0,
        "lor": True,
        "lor_prob": 1.0,
        "iterations": 4,
        "lr": 0.05,
        "batch_size": 8,
        "micro_batch_size": micro,
        "channels_last": channels_last,
    }
    base.update(kw)
    return SynthConfig(**base)  # type: ignore[arg-type]


def synth(cfg: SynthConfig) -> Synthesizer:
    return Synthesizer(bn_cnn(), cfg, image_shape=SHAPE, num_classes=5)


def centres() -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of classes 0-2 only (features of other noise), so MDC's mask is partial."""
    s = synth(config(None))
    store = ClassCentres(5, 16)
    store.update(s.features(initial_noise(SEEDS[:3] + 1000, SHAPE)), torch.tensor([0, 1, 2]))
    return store.snapshot()


def step_gradient(s: Synthesizer, micro: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    params = sample_lor_params(8, 12, 12, min_area=0.5, generator=gen)
    sil_t = torch.tensor([1.0, 0.97, 1.0, 0.96, 1.0, 1.0, 0.99, 1.0])
    c_feats, c_mask = centres()
    x = initial_noise(SEEDS, SHAPE).contiguous(memory_format=s.memory_format).requires_grad_(True)
    if micro:
        denom = c_mask[LABELS].float().sum() + 1e-6
        terms = s._micro_batch_step(x, params, LABELS, sil_t, c_feats, c_mask, denom)
    else:
        terms = s._batch_step([x], [params], LABELS, sil_t, c_feats, c_mask)
    assert x.grad is not None
    return x.grad, terms


@pytest.mark.parametrize("channels_last", [True, False])
def test_micro_batches_give_the_whole_batch_gradient(channels_last: bool) -> None:
    g_full, t_full = step_gradient(synth(config(None, channels_last)), micro=False)
    g_micro, t_micro = step_gradient(synth(config(3, channels_last)), micro=True)
    assert set(t_full) == set(t_micro) == {"bns_mean", "bns_var", "ce", "sil", "mdc_lower", "mdc_upper"}
    assert float(t_full["mdc_lower"]) > 0.1  # the coupled MDC denominator matters
    for k in t_full:
        assert_close(t_micro[k], t_full[k], rtol=1e-5, atol=1e-7)
    assert float(g_full.abs().max()) > 1e-4
    assert_close(g_micro, g_full, rtol=1e-5, atol=1e-7)
    if channels_last:
        assert g_micro.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [True, False])
def test_micro_batches_optimize_the_same_images(channels_last: bool) -> None:
    c = centres()
    full = synth(config(None, channels_last)).synthesize(LABELS, SEEDS, batch_seed=3, centres=c)
    micro = synth(config(3, channels_last)).synthesize(LABELS, SEEDS, batch_seed=3, centres=c)
    assert not torch.equal(full.images, initial_noise(SEEDS, SHAPE))
    assert_close(micro.images, full.images, rtol=1e-5, atol=1e-6)
    assert_close(micro.features, full.features, rtol=1e-5, atol=1e-6)
    for k, values in full.history.items():
        assert_close(torch.tensor(micro.history[k]), torch.tensor(values), rtol=1e-5, atol=1e-7)


def test_a_micro_batch_as_large_as_the_batch_is_the_one_pass_path() -> None:
    full = synth(config(None)).synthesize(LABELS, SEEDS, batch_seed=3)
    same = synth(config(8)).synthesize(LABELS, SEEDS, batch_seed=3)
    assert torch.equal(full.images, same.images)


def test_micro_batches_refuse_what_they_cannot_keep_exact() -> None:
    with pytest.raises(ValueError, match="cannot keep the ADI term exact"):
        SynthConfig(method="adi", micro_batch_size=4)
    with pytest.raises(ValueError, match=r"does not apply to generate\.method=gdfq"):
        SynthConfig(method="gdfq", micro_batch_size=4)
