"""Student checkpoints, test-set loading and the evaluation helpers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from intraq_core.config import EvalConfig, ModelConfig, QuantConfig
from intraq_core.data import DatasetError, load_test_set
from intraq_core.evaluate import agreement, agreement_sums, top1
from intraq_core.models import create_model, resolve_model_config
from intraq_core.models.checkpoint import CheckpointError
from intraq_core.quant import calibrate_ranges
from intraq_core.student import build_student, load_student, student_checkpoint_bytes

TEACHER = ModelConfig(arch="cifar_resnet20", weights="cifar10-resnet20")


def test_student_checkpoint_round_trip(tmp_path: Path) -> None:
    model_cfg = resolve_model_config(TEACHER)
    teacher = create_model(model_cfg)
    student = build_student(teacher, QuantConfig(w_bits=4, a_bits=4))
    x = torch.randn(16, 3, 32, 32)
    calibrate_ranges(student, [x])
    path = tmp_path / "student.pt"
    path.write_bytes(student_checkpoint_bytes(student, model_cfg, QuantConfig(w_bits=4, a_bits=4)))
    again, mcfg, qcfg, _ = load_student(path)
    assert qcfg.w_bits == 4 and mcfg.mean == model_cfg.mean
    with torch.no_grad():
        torch.testing.assert_close(again(x), student.eval()(x))
    assert any(p.requires_grad for p in student.parameters())


def test_foreign_file_is_not_a_student(tmp_path: Path) -> None:
    p = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, p)
    with pytest.raises(CheckpointError, match="student"):
        load_student(p)


def test_npz_test_set_and_top1(cifar10_test_path: Path) -> None:
    model_cfg = resolve_model_config(TEACHER)
    ts = load_test_set(EvalConfig(data=str(cifar10_test_path), limit=200), model_cfg)
    assert ts.num_samples == 200
    res = top1(create_model(model_cfg), ts.batches(100))
    assert res == {"top1": 91.0, "n": 200}  # 182 of the first 200 (91.73% on all 10,000, test_cifar_resnet)


def test_class_mismatch_is_an_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.array([0, 1, 2, 12]))
    cfg = resolve_model_config(TEACHER)
    with pytest.raises(DatasetError, match=r"label 12 at index 3 is not a class index \(0\.\.9: the model predicts 10"):
        load_test_set(EvalConfig(data=str(tmp_path / "t.npz")), cfg)


def test_malformed_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", pixels=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(DatasetError, match="'images' and 'labels'"):
        load_test_set(EvalConfig(data=str(tmp_path / "t.npz")), resolve_model_config(TEACHER))


def test_image_folder_classes_must_match(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / c / "x.jpg")
    cfg = resolve_model_config(TEACHER)
    with pytest.raises(DatasetError, match=r"has 2 class folders but the model predicts 10 classes.*eval\.classes"):
        load_test_set(EvalConfig(data=str(tmp_path)), cfg)


def test_agreement_and_kl_of_two_different_models_by_hand() -> None:
    """Teacher: logits = x. Student: logits = x / 2 + (ln 2, 0). On four inputs (logit pairs) the
    softmax probabilities are exact fractions, so the agreement and the mean KL(teacher || student)
    are computed by hand; batches of 3 make the sums span two batches."""
    teacher = nn.Linear(2, 2, bias=False)
    student = nn.Linear(2, 2)
    with torch.no_grad():
        teacher.weight.copy_(torch.eye(2))
        student.weight.copy_(0.5 * torch.eye(2))
        student.bias.copy_(torch.tensor([math.log(2.0), 0.0]))
    x = torch.tensor([[math.log(4.0), 0.0], [0.0, math.log(1.5)], [math.log(3.0), 0.0], [0.0, math.log(9.0)]])
    # teacher p: (.8, .2), (.4, .6), (.75, .25), (.1, .9); argmax 0, 1, 0, 1
    # student weights e^s: (4, 1), (2, sqrt 1.5), (2 sqrt 3, 1), (2, 3); argmax 0, 0, 0, 1: the second disagrees
    r15, r3 = math.sqrt(1.5), math.sqrt(3.0)
    p = [(0.8, 0.2), (0.4, 0.6), (0.75, 0.25), (0.1, 0.9)]
    q = [(0.8, 0.2), (2 / (2 + r15), r15 / (2 + r15)), (2 * r3 / (2 * r3 + 1), 1 / (2 * r3 + 1)), (0.4, 0.6)]
    kls = [sum(pi * math.log(pi / qi) for pi, qi in zip(a, b, strict=True)) for a, b in zip(p, q, strict=True)]
    assert kls[0] == 0.0 and min(kls[1:]) > 1e-3
    res = agreement(student, teacher, x, batch_size=3)
    assert res["agreement"] == 75.0
    assert res["kl"] == pytest.approx(sum(kls) / 4, rel=1e-5)
    # KL is not symmetric: the reverse direction, KL(student || teacher), is another number.
    reverse = sum(sum(qi * math.log(qi / pi) for pi, qi in zip(a, b, strict=True)) for a, b in zip(p, q, strict=True))
    assert abs(reverse / 4 - res["kl"]) > 0.01
    sums = agreement_sums(student, teacher, x, batch_size=3)
    torch.testing.assert_close(sums, torch.tensor([3.0, sum(kls), 4.0], dtype=torch.float64), rtol=1e-5, atol=0)
