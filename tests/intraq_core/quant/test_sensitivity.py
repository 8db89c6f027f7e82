"""``activation_sensitivity``: each activation quantizer alone, ranked, and the student left as it was."""

from __future__ import annotations

import copy
import doctest

import torch
import torch.nn.functional as F
from torch import nn

from intraq_core.config import QuantConfig
from intraq_core.quant import (
    act_quantizers,
    calibrate_ranges,
    quantize,
    sensitivity,
    set_act_mode,
    weight_quantized_layers,
)
from intraq_core.quant.methods import CalibrationInputs, run_calibration
from intraq_core.quant.sensitivity import activation_sensitivity, format_sensitivity, recorded_sensitivity


def _teacher() -> nn.Module:
    """Two conv blocks; the second one's output has one channel 1000x the others, so a 4-bit grid
    over its range sets the informative channels to zero (the first block's output stays benign).

    The outlier is in the last quantized tensor: ranges are calibrated with the quantizers upstream
    on, so an outlier upstream would spoil every range after it as well."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )
    with torch.no_grad():
        net[4].weight[0] = 1000.0  # the outlier channel
        net[4].bias[0] = 2000.0
        net[8].weight *= 50.0  # logits that depend on the features (a confident classifier)
        net[8].weight[:, 0] = 0.0  # ... which ignores the outlier channel: only its range hurts
    return net.eval()


def test_the_tensor_whose_range_an_outlier_spoils_ranks_first_and_the_student_is_left_as_it_was() -> None:
    teacher = _teacher()
    student = quantize(teacher, QuantConfig(w_bits=4, a_bits=4))
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    calibrate_ranges(student, [images])
    quants = act_quantizers(student)
    weights = [layer.weight_quant for layer in weight_quantized_layers(student).values()]
    weights[0].enabled = False  # a state to restore that is not the default
    student.train()
    modes = {n: q.mode for n, q in quants.items()}

    rows = activation_sensitivity(teacher, student, images)

    assert rows[0]["name"] == "act_quant._5"  # the second block's output (read by the pool, then the linear)
    assert len(rows) == len(quants) and {r["bits"] for r in rows} == {4}
    assert rows[0]["kl"] > 10 * rows[1]["kl"], rows
    # Every row by hand: weights float, only that quantizer on.
    set_act_mode(student, "off")
    for w in weights:
        w.enabled = False
    student.eval()
    with torch.no_grad():
        target = teacher(images).log_softmax(1)
        for row in rows:
            quants[row["name"]].mode = "frozen"
            pred = student(images).log_softmax(1)
            quants[row["name"]].mode = "off"
            by_hand = F.kl_div(pred, target, log_target=True, reduction="batchmean")
            torch.testing.assert_close(torch.tensor(row["kl"]), by_hand)
    # Restored afterwards (checked on a fresh call, the hand computation changed the modes above).
    for n, q in quants.items():
        q.mode = modes[n]
    for w, on in zip(weights, (False, True, True), strict=True):
        w.enabled = on
    student.train()
    activation_sensitivity(teacher, student, images)
    assert {n: q.mode for n, q in quants.items()} == modes
    assert [w.enabled for w in weights] == [False, True, True]
    assert student.training


def test_calibration_with_the_teacher_records_the_ranking_and_says_it_in_one_line() -> None:
    teacher = _teacher()
    student = quantize(teacher, QuantConfig(w_bits=4, a_bits=4))
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    report = run_calibration(student, QuantConfig(w_bits=4, a_bits=4), CalibrationInputs([images], teacher))
    assert report["sensitivity"] == recorded_sensitivity(student) == recorded_sensitivity(copy.deepcopy(student))
    line = format_sensitivity(report["sensitivity"], top=1)
    assert line.startswith("act_quant._5 (A4): KL ")
    assert f"over {len(act_quantizers(student))} tensors" in line
    # Without the teacher nothing is measured.
    other = quantize(teacher, QuantConfig(w_bits=4, a_bits=4))
    assert "sensitivity" not in run_calibration(other, QuantConfig(w_bits=4, a_bits=4), CalibrationInputs([images]))
    assert recorded_sensitivity(other) is None


def test_docstring_example_runs() -> None:
    result = doctest.testmod(sensitivity, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_with_block_reconstruction_the_ranking_is_taken_at_the_calibrated_ranges_before_it_learns() -> None:
    """Reconstruction learns step sizes that compensate for the other quantizers: scored after it, every tensor
    alone looks costly (each row would measure the mismatch, not the tensor)."""
    teacher = _teacher()
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    cfg = QuantConfig(
        method="reconstruct",
        w_bits=4,
        a_bits=4,
        weight_range="lp",
        act_range="lp",
        reconstruct={"iterations": 40, "batch_size": 8, "act_lr": 1e-2},
    )
    student = quantize(teacher, cfg)
    report = run_calibration(student, cfg, CalibrationInputs([images], teacher, images, seed=0))
    fresh = quantize(teacher, cfg)
    calibrate_ranges(fresh, [images])
    assert report["sensitivity"] == activation_sensitivity(teacher, fresh, images)
    # ... and reconstruction did move the step sizes the ranking would otherwise have used.
    after = activation_sensitivity(teacher, student, images)
    assert [r["kl"] for r in after] != [r["kl"] for r in report["sensitivity"]]
