"""``timm:<name>`` models (optional extra): defaults, weights metadata without download, errors."""

from __future__ import annotations

import sys

import pytest
import torch

from intraq_core.config import IMAGENET_MEAN, ModelConfig
from intraq_core.errors import ModelError, UnknownModelError
from intraq_core.models import create_model, resolve_model_config
from intraq_core.quant import act_quantizers, quantize

timm = pytest.importorskip("timm")


def test_random_resnet18_at_cifar_size_quantizes() -> None:
    cfg = resolve_model_config(ModelConfig(arch="timm:resnet18"))
    assert (cfg.num_classes, cfg.image_size, cfg.mean) == (1000, 224, IMAGENET_MEAN)
    model = create_model(ModelConfig(arch="timm:resnet18", num_classes=10, image_size=32))
    student = quantize(model, __import__("intraq_core.config", fromlist=["QuantConfig"]).QuantConfig())
    assert len(act_quantizers(student)) == 17  # stem ReLU + 2 per BasicBlock x 8
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_published_weights_metadata_needs_no_download() -> None:
    cfg = resolve_model_config(ModelConfig(arch="timm:resnet18", weights="timm:a1_in1k"))
    assert (cfg.num_classes, cfg.image_size) == (1000, 224)
    # timm's evaluation preprocessing: crop_pct 0.95 (shorter side floor(224 / 0.95) = 235), bicubic.
    assert (cfg.crop_pct, cfg.resize_size, cfg.interpolation) == (0.95, 235, "bicubic")
    with pytest.raises(ValueError, match=r"unknown timm weights 'nope' for resnet18; available: .*a1_in1k"):
        resolve_model_config(ModelConfig(arch="timm:resnet18", weights="timm:nope"))
    with pytest.raises(ValueError, match=r"have 1000 classes, but num_classes=10"):  # before any download
        create_model(ModelConfig(arch="timm:resnet18", weights="timm:DEFAULT", num_classes=10))
    with pytest.raises(ValueError, match=r"are timm weights, but arch 'cifar_resnet20' is not"):
        resolve_model_config(ModelConfig(arch="cifar_resnet20", weights="timm:DEFAULT"))


def test_unknown_names() -> None:
    with pytest.raises(UnknownModelError, match=r"timm has no model 'resnet181'; did you mean .*'timm:resnet18'"):
        resolve_model_config(ModelConfig(arch="timm:resnet181"))
    with pytest.raises(UnknownModelError, match=r"model.weights=timm:a1_in1k"):
        resolve_model_config(ModelConfig(arch="timm:resnet18.a1_in1k"))


def test_without_timm_installed_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ModelError, match=r"pip install 'intraq-pipeline\[timm\]'"):
        resolve_model_config(ModelConfig(arch="timm:resnet18"))
