"""Packed groups (generate.groups_per_pass): G batches in one pass give each batch's separate images.

Three groups of 8 images (own labels, seeds, batch seeds) of the small BN CNN of the micro-batch
tests, every per-batch term active: BNS (per-group batch statistics), CE, SIL (per-group targets),
MDC (per-group denominator, partial centre mask), LOR on a per-group coin (p = 0.5, so groups are
cropped on different iterations) and a plateau schedule with patience 1 (each group's lr follows
its own loss; the test checks that the groups' schedules differ before the last step).

Tolerance: packing changes only the float32 reduction order of the teacher's convolutions and of
the per-group statistics (a [G, M, C] mean instead of a [M, C] one), a few ulps (eps = 1.2e-7) of
the values summed. Adam's steps are lr * m / sqrt(v), insensitive to a relative error of g (the
first is lr * sign(g)); later steps move by lr times the relative error of m / sqrt(v), a few
1e-7, so after 10 steps of lr 0.5 the pixels (O(1) to O(5)) agree to rtol 1e-5 / atol 1e-5, the
features and loss histories to rtol 1e-5. (On this CPU the two agree bit for bit.) Whole-pack
statistics, a shared LOR coin or a shared schedule move pixels by O(lr).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from intraq_core.config import SynthConfig
from intraq_core.synth.engine import Synthesizer
from tests.intraq_core.synth.test_micro_batches import SHAPE, bn_cnn, centres

LABELS = [torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]), torch.tensor([4, 4, 3, 3, 2, 2, 1, 0]), torch.arange(8) % 5]
SEEDS = [torch.arange(8) + 40, torch.arange(8) + 140, torch.arange(8) + 240]
BATCH_SEEDS = [3, 11, 12]


def config(**kw: object) -> SynthConfig:
    base: dict[str, object] = {
        "method": "custom",
        "bns_weight": 1.0,
        "ce_weight": 0.5,
        "sil_weight": 1.0,
        "mdc_weight": 1.0,
        "mdc_lower": 1.0,  # the lower hinge fires at once against the centres
        "mdc_upper": 2.0,
        "lor": True,
        "lor_prob": 0.5,
        "iterations": 10,
        "lr": 0.5,
        "plateau_patience": 1,
        "batch_size": 8,
    }
    base.update(kw)
    return SynthConfig(**base)  # type: ignore[arg-type]


def lr_trace(totals: list[float], cfg: SynthConfig) -> list[float]:
    """The lr a plateau schedule fed with ``totals`` uses after each step."""
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
    )
    out = []
    for t in totals:
        sched.step(t)
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("channels_last", [True, False])
def test_packed_groups_give_the_separate_runs_images(channels_last: bool) -> None:
    cfg = config(channels_last=channels_last)
    c = centres()
    groups = list(zip(LABELS, SEEDS, BATCH_SEEDS, strict=True))
    alone = [Synthesizer(bn_cnn(), cfg, image_shape=SHAPE, num_classes=5).synthesize(*g, centres=c) for g in groups]
    packed = Synthesizer(bn_cnn(), cfg, image_shape=SHAPE, num_classes=5).synthesize_groups(groups, centres=c)
    assert len(packed) == 3
    # The case exercises what must stay per group: schedules that differ, MDC active.
    traces = [lr_trace(r.history["total"], cfg)[:-1] for r in alone]  # the lr of steps 2..10
    assert len({tuple(t) for t in traces}) > 1 and min(min(t) for t in traces) < cfg.lr
    assert all(r.history["mdc_lower"][0] > 0.1 for r in alone)
    for a, p in zip(alone, packed, strict=True):
        assert_close(p.images, a.images, rtol=1e-5, atol=1e-5)
        assert_close(p.features, a.features, rtol=1e-5, atol=1e-5)
        assert torch.equal(p.labels, a.labels) and torch.equal(p.seeds, a.seeds)
        assert set(p.history) == set(a.history)
        for k, values in a.history.items():
            assert_close(torch.tensor(p.history[k]), torch.tensor(values), rtol=1e-5, atol=1e-7)


def test_one_group_is_the_plain_batch() -> None:
    cfg = config()
    one = Synthesizer(bn_cnn(), cfg, image_shape=SHAPE, num_classes=5)
    r = one.synthesize_groups([(LABELS[0], SEEDS[0], 3)])[0]
    assert torch.equal(r.images, one.synthesize(LABELS[0], SEEDS[0], 3).images)


def test_packed_groups_refuse_what_they_cannot_keep_per_group() -> None:
    with pytest.raises(ValueError, match="groups_per_pass cannot keep the ADI term"):
        SynthConfig(method="adi", groups_per_pass=2)
    with pytest.raises(ValueError, match="do not combine"):
        SynthConfig(groups_per_pass=2, micro_batch_size=64)
    with pytest.raises(ValueError, match=r"does not apply to generate\.method=qimera"):
        SynthConfig(method="qimera", groups_per_pass=2)
    s = Synthesizer(bn_cnn(), config(), image_shape=SHAPE, num_classes=5)
    with pytest.raises(ValueError, match="one size"):
        s.synthesize_groups([(LABELS[0], SEEDS[0], 1), (LABELS[1][:4], SEEDS[1][:4], 2)])
