"""Student checkpoints, test-set loading and the evaluation helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from intraq_core.config import EvalConfig, ModelConfig, QuantConfig
from intraq_core.data import DatasetError, load_test_set
from intraq_core.evaluate import agreement, top1
from intraq_core.models import create_model, resolve_model_config
from intraq_core.models.checkpoint import CheckpointError
from intraq_core.quant import calibrate
from intraq_core.student import build_student, load_student, student_checkpoint_bytes

TEACHER = ModelConfig(arch="cifar_resnet20", weights="cifar10-resnet20")


def test_student_checkpoint_round_trip(tmp_path: Path) -> None:
    model_cfg = resolve_model_config(TEACHER)
    teacher = create_model(model_cfg)
    student = build_student(teacher, QuantConfig(w_bits=4, a_bits=4))
    x = torch.randn(16, 3, 32, 32)
    calibrate(student, [x])
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
    assert res["n"] == 200 and 80.0 < res["top1"] <= 100.0


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


def test_agreement_of_a_model_with_itself() -> None:
    model = create_model(TEACHER)
    res = agreement(model, model, torch.randn(10, 3, 32, 32))
    assert res["agreement"] == 100.0 and res["kl"] == pytest.approx(0.0, abs=1e-6)
