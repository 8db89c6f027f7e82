"""``model.arch = "package.module:callable"``: a user's model, built, resolved, loaded and shipped."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from intraq_core.config import ModelConfig
from intraq_core.errors import ModelError, UnknownModelError
from intraq_core.models import create_model, local_source, resolve_model_config

USER_MODULE = """
import torch.nn as nn


class SmallVGG(nn.Module):
    def __init__(self, num_classes=10, width=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def build_net(num_classes=10, width=4):
    return SmallVGG(num_classes, width)


def fixed_head():  # takes no num_classes: its head decides
    return SmallVGG(7)


def declared(**kwargs):
    return SmallVGG(**kwargs)


declared.pretrained_cfg = {
    "input_size": (3, 40, 40), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
    "crop_pct": 0.8, "interpolation": "bicubic",
}


def not_a_model():
    return 42


BUILT = []


def counted(num_classes=10):  # records every build
    BUILT.append(num_classes)
    return SmallVGG(num_classes)
"""


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module ``user_nets_<n>`` in a temporary directory on sys.path; returns its name."""
    name = f"user_nets_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_build_with_kwargs_and_classes(user_module: str) -> None:
    model = create_model(
        ModelConfig(arch=f"{user_module}:build_net", num_classes=5, kwargs={"width": 6}, image_size=32).model_copy(
            update={"mean": (0.5,) * 3, "std": (0.5,) * 3}
        )
    )
    assert not model.training
    assert model.classifier.out_features == 5 and model.classifier.in_features == 12
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_defaults_come_from_the_callable_or_the_model(user_module: str) -> None:
    declared = resolve_model_config(ModelConfig(arch=f"{user_module}:declared"))
    assert (declared.crop_pct, declared.resize_size, declared.interpolation) == (0.8, 50, "bicubic")
    assert (declared.image_size, declared.mean, declared.std, declared.num_classes) == (
        40,
        (0.5, 0.5, 0.5),
        (0.25, 0.25, 0.25),
        10,  # from the probe model's last nn.Linear
    )
    head = resolve_model_config(
        ModelConfig(arch=f"{user_module}:fixed_head", image_size=32, mean=(0,) * 3, std=(1,) * 3)
    )
    assert head.num_classes == 7
    with pytest.raises(ValueError, match=r"no default for image_size; set model.image_size"):
        resolve_model_config(ModelConfig(arch=f"{user_module}:build_net"))


def test_weights_in_either_layout_load_weights_only(user_module: str, tmp_path: Path) -> None:
    arch = f"{user_module}:build_net"
    spec = {"arch": arch, "image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    src = create_model(ModelConfig(**spec))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, tmp_path / "w.pt")
    x = torch.randn(2, 3, 32, 32)
    for weights in ("plain.pt", "w.pt"):
        loaded = create_model(ModelConfig(**spec, weights=str(tmp_path / weights)))
        torch.testing.assert_close(loaded(x), src.eval()(x))


def test_one_line_errors(user_module: str) -> None:
    spec = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    with pytest.raises(UnknownModelError, match=r"no module named 'no_such_mod'.*PYTHONPATH"):
        create_model(ModelConfig(arch="no_such_mod:build", **spec))
    with pytest.raises(UnknownModelError, match=r"has no 'build_nett'; did you mean 'build_net'"):
        create_model(ModelConfig(arch=f"{user_module}:build_nett", **spec))
    with pytest.raises(ModelError, match=r"returned a int, not a torch.nn.Module"):
        create_model(ModelConfig(arch=f"{user_module}:not_a_model", **spec))
    with pytest.raises(ModelError, match=r"cannot be called with .*depth=3.*fix model.kwargs"):
        create_model(ModelConfig(arch=f"{user_module}:build_net", kwargs={"depth": 3}, **spec))
    with pytest.raises(ModelError, match=r"last nn.Linear 'classifier' has 7 outputs, but model.num_classes=10"):
        create_model(ModelConfig(arch=f"{user_module}:fixed_head", num_classes=10, **spec))
    with pytest.raises(ValueError, match=r"model.kwargs does not apply to 'cifar_resnet20'"):
        create_model(ModelConfig(arch="cifar_resnet20", kwargs={"width": 2}))
    # A callable that raises: its error's first line, as a ModelError (the original is the cause).
    with pytest.raises(ModelError) as info:
        create_model(ModelConfig(arch="tests.odd_models:raising", num_classes=10, **spec))
    assert str(info.value) == (
        "model.arch 'tests.odd_models:raising': calling it with (num_classes=10) raised RuntimeError: cannot build "
        "the model: its config file is missing; fix the callable or model.kwargs"
    )
    assert isinstance(info.value.__cause__, RuntimeError)


def test_local_source_is_the_user_file_not_installed_code(user_module: str, tmp_path: Path) -> None:
    assert local_source(f"{user_module}:build_net") == (tmp_path / f"{user_module}.py").resolve()
    package = tmp_path / "userpkg"
    (package / "nets").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets" / "__init__.py").write_text("from torch import nn\ndef make():\n    return nn.Linear(2, 2)\n")
    assert local_source("userpkg.nets:make") == package.resolve()
    assert local_source("torchvision.models:resnet18") is None  # installed: every node has it
    assert local_source("intraq_core.models.cifar_resnet:cifar_resnet") is None  # the project itself
    assert local_source("cifar_resnet20") is None


def test_user_model_without_batchnorm_builds(user_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plain_nets.py").write_text(
        "import torch.nn as nn\n"
        "def mlp(num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, num_classes))\n"
    )
    model = create_model(ModelConfig(arch="plain_nets:mlp", image_size=8, mean=(0,) * 3, std=(1,) * 3))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_a_fully_specified_model_is_not_built_to_resolve_it(user_module: str) -> None:
    import importlib

    built = importlib.import_module(user_module).BUILT
    full = ModelConfig(arch=f"{user_module}:counted", num_classes=3, image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    resolved = resolve_model_config(full)
    assert built == [] and (resolved.crop_pct, resolved.interpolation) == (0.875, "bilinear")
    resolve_model_config(full.model_copy(update={"num_classes": None}))  # the classes need a probe model
    assert built == [10]
