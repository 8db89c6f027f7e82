"""Introspection: BN layers, the classifier found by execution order, feature taps."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from intraq_core.models import FeatureTap, bn_layers, cifar_resnet, classifier_layer, flatten_feature


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "resnet20": cifar_resnet(20).eval(),
        "resnet18": torchvision.models.resnet18(num_classes=10).eval(),
        "mobilenet_v2": torchvision.models.mobilenet_v2(num_classes=10).eval(),
    }


EXPECTED = {"resnet20": ("linear", 64), "resnet18": ("fc", 512), "mobilenet_v2": ("classifier.1", 1280)}


def test_bn_layers_in_module_order() -> None:
    layers = bn_layers(cifar_resnet(20))
    assert len(layers) == 19
    assert [n for n, _ in layers[:3]] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    assert all(isinstance(m, nn.BatchNorm2d) for _, m in layers)
    assert len(bn_layers(cifar_resnet(20, shortcut="B"))) == 21


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_classifier_layer_found_by_execution(models, name: str) -> None:
    model = models[name]
    layer_name, layer = classifier_layer(model, torch.randn(2, 3, 32, 32))
    assert (layer_name, layer.in_features) == EXPECTED[name]
    assert layer is model.get_submodule(layer_name)


def test_classifier_layer_leaves_training_state_and_bn_stats_alone() -> None:
    model = cifar_resnet(20).train()
    before = model.bn1.running_mean.clone()
    classifier_layer(model, torch.randn(4, 3, 32, 32) * 5 + 3)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.bn1.running_mean, before)
    with pytest.raises(ValueError, match=r"no nn.Linear"):
        classifier_layer(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_feature_tap_penultimate(models, name: str) -> None:
    model = models[name]
    layer_name, dim = EXPECTED[name]
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    with FeatureTap(model) as tap:
        logits = model(x)
        assert tap.layer_name == layer_name
        assert tap.features is not None and tap.features.shape == (3, dim)
        head = model.get_submodule(layer_name)
        torch.testing.assert_close(head(tap.features), logits)
        tap.features.square().sum().backward()  # features keep their autograd graph
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_feature_tap_updates_every_forward_and_stops_after_remove() -> None:
    model = cifar_resnet(20).eval()
    tap = FeatureTap(model, "penultimate")
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        first = tap.features
        model(torch.randn(5, 3, 32, 32))
        assert tap.features is not first and tap.features.shape == (5, 64)
        tap.remove()
        model(torch.randn(7, 3, 32, 32))
    assert tap.features.shape == (5, 64)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_feature_tap_named_layer_output() -> None:
    model = cifar_resnet(20).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), FeatureTap(model, "layer2") as tap:
        model(x)
        expected = model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x))))).mean(dim=(2, 3))
    assert tap.layer_name == "layer2"
    torch.testing.assert_close(tap.features, expected)
    with torch.no_grad(), FeatureTap(model, "linear") as tap:
        out = model(x)
    torch.testing.assert_close(tap.features, out)
    with pytest.raises(ValueError, match=r"no module named 'layer4'.*did you mean"):
        FeatureTap(model, "layer4")


def test_flatten_feature() -> None:
    assert flatten_feature(torch.ones(2, 8, 4, 4)).shape == (2, 8)
    assert flatten_feature(torch.ones(2, 8, 3)).shape == (2, 24)
    assert flatten_feature(torch.ones(2, 8)).shape == (2, 8)
