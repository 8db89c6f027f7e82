"""The self-watching selector: scores at start / every N epochs / end, keeps the best by held-out KL."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from intraq_core.selection import RULE, Selector


def _pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    teacher = nn.Linear(6, 4).eval()
    student = nn.Linear(6, 4)
    return teacher, student, torch.randn(32, 6)


def _copy(src: nn.Module, dst: nn.Module, scale: float = 1.0) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight * scale)
        dst.bias.copy_(src.bias * scale)


def test_worse_final_student_is_replaced_by_the_best_checkpoint():
    teacher, student, held = _pair()
    sel = Selector(teacher, held, every=2)
    sel.start(student)  # random student: bad
    _copy(teacher, student, 0.9)
    sel.on_epoch(0, student, last_epoch=5)  # not an evaluation epoch (every 2)
    sel.on_epoch(1, student, last_epoch=5)  # evaluated: close to the teacher
    best_state = {k: v.clone() for k, v in student.state_dict().items()}
    _copy(teacher, student, -1.0)  # training ruins it
    sel.on_epoch(3, student, last_epoch=5)
    selection = sel.finish(student, final_epoch=5)
    assert [e["epoch"] for e in selection.evaluations] == [None, 1, 3, 5]
    assert selection.selected_epoch == 1 and not selection.kept_final
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, best_state[k])
    kls = [e["kl"] for e in selection.evaluations]
    assert kls[1] == min(kls)
    assert "epoch 2" in selection.message and "worse" in selection.message
    assert selection.summary()["selection_rule"] == RULE


def test_improving_student_keeps_the_final_one_and_ties_go_to_the_latest():
    teacher, student, held = _pair()
    probe = torch.randn(8, 6)
    sel = Selector(teacher, held, probe, every=1)
    sel.start(student)
    _copy(teacher, student)
    sel.on_epoch(0, student, last_epoch=1)
    selection = sel.finish(student, final_epoch=1)  # same weights as epoch 0: a tie
    assert selection.kept_final and selection.selected_epoch == 1
    assert selection.message.startswith("final student kept")
    last = selection.evaluations[-1]
    assert set(last) >= {"holdout", "probe", "kl", "agreement", "vetoed"} and last["agreement"] == 100.0
    # The score is the held-out split's KL; the probe only vetoes.
    assert last["kl"] == last["holdout"]["kl"]


def test_probe_vetoes_a_student_that_fits_the_held_out_images_but_collapsed_elsewhere():
    torch.manual_seed(0)
    teacher = nn.Linear(6, 4).eval()
    held = torch.randn(32, 6) * 0.001  # a degenerate data split, e.g. noise
    probe = torch.randn(64, 6) * 3
    student = nn.Linear(6, 4)
    _copy(teacher, student)
    with torch.no_grad():
        student.bias.add_(torch.tensor([0.3, -0.3, 0.2, 0.0]))  # the start: close to the teacher, not exact
    sel = Selector(teacher, held, probe, every=1)
    sel.start(student)
    good = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad():  # "training" fits the held-out inputs (near 0) exactly, wrecks the rest
        student.bias.copy_(teacher.bias)
        student.weight.copy_(-teacher.weight * 50)
    sel.on_epoch(0, student, last_epoch=1)
    start, row = sel.evaluations
    assert row["kl"] < start["kl"]  # by the held-out KL alone it would win ...
    assert row["vetoed"] and row["probe"]["agreement"] < 0.5 * start["probe"]["agreement"]  # ... but it collapsed
    selection = sel.finish(student, final_epoch=1)
    assert selection.selected_epoch is None
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, good[k])


def test_bad_start_is_kept_when_training_only_hurts():
    teacher, student, held = _pair()
    _copy(teacher, student, 0.95)
    start_state = {k: v.clone() for k, v in student.state_dict().items()}
    sel = Selector(teacher, held, every=1)
    sel.start(student)
    _copy(teacher, student, 3.0)
    sel.on_epoch(0, student, last_epoch=1)
    selection = sel.finish(student, final_epoch=1)
    assert selection.selected_epoch is None and "the starting student" in selection.message
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, start_state[k])


def test_state_round_trip_resumes_the_choice():
    teacher, student, held = _pair()
    sel = Selector(teacher, held, every=1)
    _copy(teacher, student)
    sel.start(student)
    state = sel.state()
    again = Selector(teacher, held, every=1)
    again.load_state(state)
    _copy(teacher, student, -2.0)
    selection = again.finish(student, final_epoch=0)
    assert selection.selected_epoch is None and len(selection.evaluations) == 2


def test_needs_images():
    teacher, _, _ = _pair()
    with pytest.raises(ValueError, match="held-out or probe"):
        Selector(teacher, None, torch.empty(0, 6))


def test_held_out_images_are_scored_with_their_augmented_views():
    teacher, student, held = _pair()
    calls = []

    def negate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        calls.append(gen.initial_seed())
        return -x

    sel = Selector(teacher, held, every=1, augment=negate, views=2, seed=7)
    # The score is the KL over images and views together; views are re-drawn at the same seed.
    row = sel.evaluate(student)
    assert calls == [7, 7]
    plain = Selector(teacher, torch.cat([held, -held, -held]), every=1).evaluate(student)
    assert row["kl"] == pytest.approx(plain["kl"]) and row["agreement"] == pytest.approx(plain["agreement"])


def test_workers_sum_their_held_out_scores():
    teacher, student, held = _pair()
    halves = [held[:16], held[16:]]
    # Each "worker" scores its half; the reduce adds the other half's sums: the whole set's score.
    from intraq_core.evaluate import agreement_sums

    other = agreement_sums(student, teacher, halves[1])
    sel = Selector(teacher, lambda: iter([halves[0]]), every=1, reduce=lambda t: t + other)
    whole = Selector(teacher, held, every=1).evaluate(student)
    row = sel.evaluate(student)
    assert row["kl"] == pytest.approx(whole["kl"]) and row["agreement"] == pytest.approx(whole["agreement"])


def test_select_final_keeps_the_final_student_and_still_records_the_scores():
    teacher, student, held = _pair()
    _copy(teacher, student)
    sel = Selector(teacher, held, every=1)
    sel.start(student)
    _copy(teacher, student, -1.0)
    ruined = {k: v.clone() for k, v in student.state_dict().items()}
    selection = sel.finish(student, final_epoch=0, keep="final")
    assert selection.kept_final and selection.selected_epoch == 0 and len(selection.evaluations) == 2
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, ruined[k])
