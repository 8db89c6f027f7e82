"""torchvision classifiers: building, fx tracing, weights metadata (never downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from intraq_core.config import IMAGENET_MEAN, IMAGENET_STD
from intraq_core.models import create_model
from intraq_core.models.torchvision_models import (
    parse_torchvision_weights,
    torchvision_defaults,
    torchvision_model_names,
    torchvision_weights_metadata,
)


def test_names() -> None:
    names = torchvision_model_names()
    assert {"resnet18", "resnet50", "mobilenet_v2"} <= set(names)
    assert not any(n.startswith(("fasterrcnn", "fcn_", "raft")) for n in names)  # classifiers only


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_fx_traceable(name: str) -> None:
    model = create_model(f"torchvision:{name}", num_classes=10)
    assert not model.training
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
        assert model(x).shape == (2, 10)


def test_resnet50_defaults() -> None:
    model = create_model("torchvision:resnet50")
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 1000
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


def test_weights_metadata_without_download() -> None:
    meta = torchvision_weights_metadata("resnet50", "IMAGENET1K_V2")
    assert meta["num_classes"] == 1000 and meta["image_size"] == 224
    assert meta["mean"] == pytest.approx(IMAGENET_MEAN) and meta["std"] == pytest.approx(IMAGENET_STD)
    assert torchvision_weights_metadata("inception_v3", "DEFAULT")["image_size"] == 299
    assert torchvision_defaults("inception_v3")["image_size"] == 299
    assert torchvision_defaults("resnet18") == {
        "num_classes": 1000,
        "image_size": 224,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }


def test_parse_weights_tag() -> None:
    assert parse_torchvision_weights("torchvision:DEFAULT") == "DEFAULT"
    assert parse_torchvision_weights("cifar10-resnet20") is None
    assert parse_torchvision_weights(None) is None
    with pytest.raises(ValueError, match="empty"):
        parse_torchvision_weights("torchvision:")
