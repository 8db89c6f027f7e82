"""Distillation: loss against hand values, schedule, batching, a real step, divergence."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from intraq_core.config import DistillConfig
from intraq_core.distill import (
    Distiller,
    DivergenceError,
    distill,
    epoch_batches,
    lr_factor,
    reestimate_bn,
    steps_per_epoch,
)
from intraq_core.distill_losses import kd_loss


def test_kd_loss_hand_case() -> None:
    # T = 1: teacher q = (0.5, 0.5), student p = (0.8, 0.2): KL(q || p) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2).
    s = torch.tensor([[math.log(0.8), math.log(0.2)]])
    t = torch.tensor([[0.0, 0.0]])
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert_close(kd_loss(s, t, 1.0), torch.tensor(expected))
    # T = 2 scales logits by 1/2 and the loss by T^2 = 4.
    s2 = torch.tensor([[2 * math.log(0.8), 2 * math.log(0.2)]])
    assert_close(kd_loss(s2, t, 2.0), torch.tensor(4 * expected))
    assert kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_lr_schedules() -> None:
    cos = DistillConfig(epochs=10, schedule="cosine")
    assert lr_factor(cos, 0, 5) == pytest.approx(1.0)
    assert lr_factor(cos, 25, 5) == pytest.approx(0.5)
    assert lr_factor(cos, 50, 5) == pytest.approx(0.0)
    step = DistillConfig(epochs=100, schedule="step", milestones=[20, 40], gamma=0.1)
    assert lr_factor(step, 19 * 10, 10) == pytest.approx(1.0)
    assert lr_factor(step, 20 * 10, 10) == pytest.approx(0.1)
    assert lr_factor(step, 45 * 10, 10) == pytest.approx(0.01)
    assert lr_factor(DistillConfig(schedule="constant"), 999, 3) == 1.0


def test_epoch_batches_are_seeded_and_drop_last() -> None:
    a = list(epoch_batches(10, 3, epoch=0, seed=1))
    b = list(epoch_batches(10, 3, epoch=0, seed=1))
    c = list(epoch_batches(10, 3, epoch=1, seed=1))
    assert len(a) == 3 and all(len(x) == 3 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert len(set(torch.cat(a).tolist())) == 9
    fixed = list(epoch_batches(10, 4, epoch=0, seed=1, iterations=7))
    assert len(fixed) == 7
    assert steps_per_epoch(10, DistillConfig(batch_size=4)) == 2
    assert steps_per_epoch(10, DistillConfig(batch_size=4, iterations_per_epoch=200)) == 200
    assert steps_per_epoch(3, DistillConfig(batch_size=4)) == 1


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _perturbed_pair() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny teacher, a copy of the architecture with perturbed weights, 64 inputs and the teacher's labels."""
    teacher = _tiny().eval()
    student = _tiny()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(64, 3, 8, 8)
    return teacher, student, x, teacher(x).argmax(1)


def test_distillation_pulls_the_student_to_the_teacher() -> None:
    teacher, student, x, y = _perturbed_pair()
    cfg = DistillConfig(
        epochs=30, batch_size=16, lr=0.05, crop_scale=(1.0, 1.0), flip=False, weight_decay=0.0, ce_weight=0.0
    )
    with torch.no_grad():
        before = kd_loss(student(x), teacher(x), 4.0).item()
    hist = distill(student, teacher, x, y, cfg, progress=False)
    with torch.no_grad():
        after = kd_loss(student(x), teacher(x), 4.0).item()
    assert len(hist.epochs) == 30
    assert after < 0.5 * before
    assert not any(p.requires_grad for p in teacher.parameters())


def test_divergence_is_reported() -> None:
    teacher, student = _tiny().eval(), _tiny()
    cfg = DistillConfig(epochs=1, batch_size=8, lr=1e30, kd_alpha=1e30)
    d = Distiller(student, teacher, cfg, steps_per_epoch=1)
    x = torch.randn(8, 3, 8, 8)
    y = torch.zeros(8, dtype=torch.long)
    with pytest.raises(DivergenceError, match="unstable"):
        for _ in range(5):
            d.step(x, y)


def test_state_dict_resume_is_exact() -> None:
    """Six steps in one go, and two steps + a weights-only checkpoint round trip + four steps into a
    fresh Distiller whose student starts elsewhere: the same losses, and bit for bit the same student,
    optimizer state (Nesterov momentum buffers, learning rates), step count and augmentation RNG.
    Momentum, the cosine schedule (the lr depends on the step count) and the random crops + flips
    (the RNG) each make the steps after the resume depend on a different part of the state."""
    teacher = _tiny().eval()
    cfg = DistillConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.9, schedule="cosine")
    assert cfg.crop_scale[0] < 1.0 and cfg.flip  # the augmentation draws from the RNG
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))) for _ in range(6)]
    a = Distiller(_tiny(), teacher, cfg, steps_per_epoch=3, seed=3)
    want = [a.step(x, y).loss for x, y in batches]

    b = Distiller(_tiny(), teacher, cfg, steps_per_epoch=3, seed=3)
    for x, y in batches[:2]:
        b.step(x, y)
    buffer = io.BytesIO()
    torch.save(b.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    other = _tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    c = Distiller(other, teacher, cfg, steps_per_epoch=3, seed=99)  # another student, another RNG seed
    c.load_state_dict(saved)
    got = [c.step(x, y).loss for x, y in batches[2:]]
    assert got == want[2:]

    sa, sc = a.state_dict(), c.state_dict()
    assert sa["step"] == sc["step"] == 6 and torch.equal(sa["rng"], sc["rng"])
    assert sa["student"].keys() == sc["student"].keys()
    for k, v in sa["student"].items():
        assert torch.equal(v, sc["student"][k]), k
    oa, oc = sa["optimizer"], sc["optimizer"]
    assert oa["param_groups"] == oc["param_groups"]  # learning rates (schedule), momentum, nesterov
    assert oa["state"].keys() == oc["state"].keys() and len(oa["state"]) == len(list(a.student.parameters()))
    for i, state in oa["state"].items():
        assert torch.equal(state["momentum_buffer"], oc["state"][i]["momentum_buffer"]), i
    # The run moved the student after the checkpoint (the comparison above is not of a frozen state).
    assert any(not torch.equal(v, saved["student"][k]) for k, v in sc["student"].items())


def test_reestimate_bn_matches_data_statistics() -> None:
    model = _tiny().eval()
    x = torch.randn(32, 3, 8, 8) * 3 + 1
    reestimate_bn(model, iter([x[:16], x[16:]]))
    bn = model[1]
    with torch.no_grad():
        pre = model[0](x)
    assert_close(bn.running_mean, pre.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert not bn.training


def test_cadence_is_a_tenth_of_the_run_and_always_includes_the_last_epoch() -> None:
    from intraq_core.distill import cadence, is_due

    assert cadence(None, 50) == 5 and cadence(None, 7) == 1 and cadence(3, 50) == 3
    assert [e for e in range(12) if is_due(e, cadence(None, 12), 12)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert [e for e in range(25) if is_due(e, cadence(None, 25), 25)] == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 24]
    assert [e for e in range(10) if is_due(e, 4, 10)] == [3, 7, 9]


def test_train_epochs_sums_over_workers_and_evaluates_and_checkpoints_at_its_cadence() -> None:
    from intraq_core.distill import EpochBatches, train_epochs
    from intraq_core.selection import Selector

    teacher = _tiny().eval()
    x = torch.randn(32, 3, 8, 8)
    y = teacher(x).argmax(1)
    held = torch.randn(8, 3, 8, 8)
    cfg = DistillConfig(epochs=5, batch_size=8, lr=0.01, eval_every=2, checkpoint_every=3)

    def run(reduce: object) -> tuple[list[dict], list[tuple[int | None, int]], list[int]]:
        evaluated: list[tuple[int | None, int]] = []
        saved: list[int] = []
        d = Distiller(_tiny(), teacher, cfg, steps_per_epoch=4, seed=1)

        class Watch(Selector):
            def consider(self, student: nn.Module, epoch: int | None) -> dict[str, float]:
                evaluated.append((epoch, d.step_count))
                return super().consider(student, epoch)

        watch = Watch(teacher, held, reduce=reduce)  # type: ignore[arg-type]
        result = train_epochs(
            d,
            EpochBatches(x, y, 8, steps=4, seed=1),
            reduce=reduce,  # type: ignore[arg-type]
            selector=watch,
            checkpoint=lambda epoch, _d, rows: saved.append(epoch),
            tags={"workers": 2},
        )
        assert result.selection is not None and result.selection.final_epoch == 4
        return result.epochs, evaluated, saved

    alone, evaluated, saved = run(None)
    # Two identical workers: sums double, means (and the selector's scores) do not change.
    twice, _, _ = run(lambda t: 2 * t)
    assert [r["loss"] for r in alone] == pytest.approx([r["loss"] for r in twice])
    assert [r.get("holdout_kl") for r in alone] == pytest.approx([r.get("holdout_kl") for r in twice], nan_ok=True)
    # The start, then after epochs 1, 3 and the last (4), in optimizer steps.
    assert evaluated == [(None, 0), (1, 8), (3, 16), (4, 20)]
    assert saved == [2, 4]  # every 3 epochs and the last
    assert [("holdout_agreement" in r) for r in alone] == [False, True, False, True, True]
    assert all(r["workers"] == 2 for r in alone) and [r["step"] for r in alone] == [4, 8, 12, 16, 20]


def test_the_loop_keeps_its_starting_student_when_training_destroys_it() -> None:
    from intraq_core.distill import distill
    from intraq_core.selection import Selector

    teacher = _tiny().eval()
    x = torch.randn(64, 3, 8, 8)
    y = teacher(x).argmax(1)
    student = _tiny()  # the teacher's weights: a perfect start
    start = {k: v.clone() for k, v in student.state_dict().items()}
    for select, kept in (("best", True), ("final", False)):
        student.load_state_dict(start)
        cfg = DistillConfig(epochs=3, batch_size=16, lr=0.5, momentum=0.9, eval_every=1, select=select)
        result = distill(student, teacher, x, y, cfg, selector=Selector(teacher, torch.randn(16, 3, 8, 8)))
        assert result.selection is not None
        same = all(torch.equal(v, start[k]) for k, v in student.state_dict().items())
        assert same is kept, select
        if select == "best":
            assert result.selection.selected_epoch is None and not result.selection.kept_final
            kls = [e["kl"] for e in result.selection.evaluations]
            assert kls[0] < min(kls[1:])  # the loop saw training hurt


def test_the_loop_keeps_a_middle_epoch_when_training_improves_then_destroys_the_student() -> None:
    """Four epochs of 4 KD steps from a perturbed student: epochs 0 and 1 at lr 0.01 pull it to the
    teacher, then the learning rate turns negative (-0.05: gradient ascent on the KD loss, training
    that destroys the student). Measured held-out KL: start 0.151, epochs 0-3: 0.088, 0.031, 1.3, 139.
    The loop must end with the student of epoch 1, bit for bit, not the start and not the final one."""
    from intraq_core.distill import EpochBatches, train_epochs
    from intraq_core.selection import Selector

    teacher, student, x, y = _perturbed_pair()
    held = torch.randn(32, 3, 8, 8)
    cfg = DistillConfig(
        epochs=4,
        batch_size=16,
        iterations_per_epoch=4,
        lr=0.01,
        schedule="constant",
        crop_scale=(1.0, 1.0),
        flip=False,
        weight_decay=0.0,
        ce_weight=0.0,
        eval_every=1,
        select="best",
    )
    d = Distiller(student, teacher, cfg, steps_per_epoch=4, seed=0)
    scored: dict[int | None, dict[str, torch.Tensor]] = {}

    class Watch(Selector):
        def consider(self, model: nn.Module, epoch: int | None) -> dict[str, float]:
            scored[epoch] = {k: v.clone() for k, v in model.state_dict().items()}  # the state it scores
            return super().consider(model, epoch)

    def before_epoch(epoch: int) -> None:
        if epoch == 2:
            for group in d.optimizer.param_groups:
                group["base_lr"] = -0.05

    result = train_epochs(
        d, EpochBatches(x, y, 16, steps=4, seed=0), selector=Watch(teacher, held), before_epoch=before_epoch
    )
    selection = result.selection
    assert selection is not None
    kls = [e["kl"] for e in selection.evaluations]
    assert [e["epoch"] for e in selection.evaluations] == [None, 0, 1, 2, 3]
    assert kls[2] < kls[1] < kls[0] and 10 * kls[2] < min(kls[3:])  # improved twice, then destroyed
    assert selection.selected_epoch == 1 and not selection.kept_final and "epoch 2" in selection.message
    kept = student.state_dict()
    assert all(torch.equal(v, scored[1][k]) for k, v in kept.items())
    for other in (None, 0, 2, 3):
        assert not all(torch.equal(v, scored[other][k]) for k, v in kept.items()), other
    assert [r.get("holdout_kl") for r in result.epochs] == kls[1:]
