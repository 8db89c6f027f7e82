"""Registry: names, config resolution precedence, create_model, project checkpoints as arch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from intraq_core.config import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from intraq_core.models import (
    CheckpointError,
    CifarResNet,
    UnknownModelError,
    create_model,
    list_models,
    load_state_dict_file,
    model_from_checkpoint,
    register_model,
    registry,
    resolve_model_config,
    save_model_checkpoint,
)


def test_list_models() -> None:
    names = list_models()
    assert names == sorted(names)
    expected = {f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)}
    expected |= {"torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2"}
    assert expected <= set(names)


def test_torchvision_imported_only_for_a_torchvision_model() -> None:
    """Every Ray actor and Train worker imports the registry with the generation or training module;
    torchvision (and the torch._dynamo it pulls in) costs each of them ~1-2 s of start-up, so it
    waits until a ``torchvision:`` model is named. A fresh interpreter, since this one has it."""
    code = (
        "import sys\n"
        "import pipeline.ray.generate, pipeline.ray.train_worker\n"
        "from intraq_core.models import create_model, get_model_spec\n"
        "create_model('cifar_resnet20')\n"
        "assert 'torchvision' not in sys.modules, 'imported without a torchvision model'\n"
        "assert get_model_spec('torchvision:resnet18').weights_prefix == 'torchvision:'\n"
        "assert 'torchvision' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cifar_defaults() -> None:
    cfg = resolve_model_config(ModelConfig())
    assert (cfg.arch, cfg.weights, cfg.num_classes, cfg.shortcut, cfg.image_size) == (
        "cifar_resnet20",
        None,
        10,
        "A",
        32,
    )
    assert cfg.mean == CIFAR10_MEAN and cfg.std == CIFAR10_STD


def test_asset_metadata_beats_defaults_and_explicit_beats_all(teacher_path: Path, tmp_path: Path) -> None:
    by_name = resolve_model_config(ModelConfig(weights="cifar10-resnet20"))
    assert by_name.mean == IMAGENET_MEAN and by_name.std == IMAGENET_STD
    copy = tmp_path / "teacher.th"
    shutil.copyfile(teacher_path, copy)
    by_hash = resolve_model_config(ModelConfig(weights=str(copy)))
    assert by_hash.mean == IMAGENET_MEAN and by_hash.weights == str(copy)
    explicit = resolve_model_config(ModelConfig(weights="cifar10-resnet20", mean=(0.1, 0.2, 0.3), image_size=40))
    assert explicit.mean == (0.1, 0.2, 0.3) and explicit.std == IMAGENET_STD and explicit.image_size == 40


def test_torchvision_defaults_and_weights_metadata() -> None:
    cfg = resolve_model_config(ModelConfig(arch="torchvision:resnet18"))
    assert (cfg.num_classes, cfg.image_size, cfg.shortcut, cfg.mean) == (1000, 224, None, IMAGENET_MEAN)
    tv = resolve_model_config(ModelConfig(arch="torchvision:mobilenet_v2", weights="torchvision:IMAGENET1K_V2"))
    assert (tv.num_classes, tv.image_size, tv.weights) == (1000, 224, "torchvision:IMAGENET1K_V2")
    with pytest.raises(ValueError, match=r"unknown torchvision weights 'NOPE'.*IMAGENET1K_V1"):
        resolve_model_config(ModelConfig(arch="torchvision:resnet18", weights="torchvision:NOPE"))
    with pytest.raises(ValueError, match=r"not"):
        resolve_model_config(ModelConfig(arch="cifar_resnet20", weights="torchvision:DEFAULT"))
    with pytest.raises(ValueError, match=r"shortcut applies only to CIFAR ResNets"):
        resolve_model_config(ModelConfig(arch="torchvision:resnet18", shortcut="B"))
    with pytest.raises(ValueError, match=r"1000 classes, but num_classes=10"):  # checked before any download
        create_model(ModelConfig(arch="torchvision:resnet18", weights="torchvision:DEFAULT", num_classes=10))


def test_preprocessing_is_part_of_the_model_spec() -> None:
    cifar = resolve_model_config(ModelConfig())
    assert (cifar.resize, cifar.crop_pct, cifar.interpolation, cifar.resize_size) == (None, None, None, None)
    plain = resolve_model_config(ModelConfig(arch="torchvision:resnet18"))  # ImageNet's 256 -> 224, bilinear
    assert (plain.crop_pct, plain.resize_size, plain.interpolation) == (0.875, 256, "bilinear")
    published = ModelConfig(arch="torchvision:resnet50", weights="torchvision:IMAGENET1K_V2")
    assert resolve_model_config(published).resize_size == 232  # its published transforms: 232 -> 224
    assert resolve_model_config(published.model_copy(update={"resize": 256})).resize_size == 256  # explicit wins
    larger = resolve_model_config(ModelConfig(arch="torchvision:resnet18", image_size=288))
    assert larger.resize_size == 329  # the ratio follows the input size: floor(288 / 0.875)
    with pytest.raises(ValueError, match=r"model\.resize or model\.crop_pct, not both"):
        ModelConfig(resize=256, crop_pct=0.875)
    with pytest.raises(ValueError, match=r"model\.resize=200 is smaller than model\.image_size=224"):
        ModelConfig(image_size=224, resize=200)


def test_unknown_arch_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError, match=r"did you mean .*'cifar_resnet20'") as info:
        create_model("cifar_resnet21")
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownModelError, match=r"'torchvision:resnet18'"):
        resolve_model_config(ModelConfig(arch="resnet18"))
    with pytest.raises(UnknownModelError, match=r"neither a registered model nor an existing checkpoint"):
        create_model("runs/nope/model.pt")


def test_create_model_with_asset_weights(teacher_path: Path) -> None:
    model = create_model(ModelConfig(weights="cifar10-resnet20"))
    assert isinstance(model, CifarResNet) and not model.training
    torch.testing.assert_close(model.linear.bias, load_state_dict_file(teacher_path)["linear.bias"])


def test_create_model_overrides() -> None:
    model = create_model(ModelConfig(arch="cifar_resnet32"), num_classes=100, shortcut="B")
    assert isinstance(model, CifarResNet) and model.depth == 32 and model.shortcut_option == "B"
    assert model.linear.out_features == 100
    assert create_model("cifar_resnet44", num_classes=20).linear.out_features == 20


def test_register_custom_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model("tiny_mlp", defaults={"image_size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    def _build(cfg: ModelConfig) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, cfg.num_classes or 0))

    assert "tiny_mlp" in list_models()
    with pytest.raises(ValueError, match=r"no default for num_classes"):
        create_model("tiny_mlp")
    model = create_model("tiny_mlp", num_classes=4)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_project_checkpoint_round_trip_via_arch(tmp_path: Path) -> None:
    src = create_model("cifar_resnet32", shortcut="B", num_classes=100)
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    path = save_model_checkpoint(
        tmp_path / "m.pt",
        src,
        ModelConfig(arch="cifar_resnet32", shortcut="B", num_classes=100, mean=(0.5,) * 3),
    )
    cfg = resolve_model_config(ModelConfig(arch=str(path)))
    assert (cfg.arch, cfg.weights, cfg.num_classes, cfg.shortcut) == ("cifar_resnet32", str(path), 100, "B")
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == CIFAR10_STD
    assert resolve_model_config(cfg) == cfg  # idempotent

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = src(x)
        for loaded in (create_model(ModelConfig(arch=str(path))), model_from_checkpoint(path)):
            assert not loaded.training
            torch.testing.assert_close(loaded(x), expected)

    # Explicit values win over the checkpoint's; a checkpoint given as weights is read too.
    assert resolve_model_config(ModelConfig(arch=str(path), mean=(0.1,) * 3)).mean == (0.1, 0.1, 0.1)
    as_weights = resolve_model_config(ModelConfig(arch="cifar_resnet32", weights=str(path)))
    assert (as_weights.num_classes, as_weights.shortcut, as_weights.mean) == (100, "B", (0.5, 0.5, 0.5))


def test_asset_metadata_beats_checkpoint_config(tmp_path: Path) -> None:
    path = save_model_checkpoint(tmp_path / "m.pt", create_model("cifar_resnet20"), {"mean": (0.5,) * 3})
    cfg = resolve_model_config(ModelConfig(arch=str(path), weights="cifar10-resnet20"))
    assert cfg.mean == IMAGENET_MEAN and cfg.weights == "cifar10-resnet20"


def test_teacher_checkpoint_records_imagenet_normalization(tmp_path: Path) -> None:
    teacher_cfg = ModelConfig(weights="cifar10-resnet20")
    path = save_model_checkpoint(tmp_path / "t.pt", create_model(teacher_cfg), teacher_cfg, extra={"acc": 91.73})
    cfg = resolve_model_config(ModelConfig(arch=str(path)))
    assert cfg.mean == IMAGENET_MEAN and cfg.std == IMAGENET_STD and cfg.shortcut == "A"


def test_model_from_checkpoint_rejects_plain_files(teacher_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not an intraq-pipeline model checkpoint"):
        model_from_checkpoint(teacher_path)
    with pytest.raises(CheckpointError, match=r"not an intraq-pipeline model checkpoint"):
        create_model(ModelConfig(arch=str(teacher_path)))


def _torchvision_style_option_b(num_classes: int) -> dict[str, torch.Tensor]:
    """A chenyaofo-style state dict: option-B shortcuts named ``downsample``, head ``fc``, no prefix."""
    sd = create_model("cifar_resnet20", shortcut="B", num_classes=num_classes).state_dict()
    return {k.replace("linear.", "fc.", 1).replace(".shortcut.", ".downsample."): v for k, v in sd.items()}


def test_shortcut_and_classes_are_read_off_the_checkpoint_keys(tmp_path: Path, teacher_path: Path) -> None:
    torch.save(_torchvision_style_option_b(100), tmp_path / "b100.pth")
    cfg = resolve_model_config(ModelConfig(arch="cifar_resnet20", weights=str(tmp_path / "b100.pth")))
    assert (cfg.shortcut, cfg.num_classes) == ("B", 100)
    model = create_model(cfg)
    assert model.shortcut_option == "B" and model.linear.out_features == 100
    # Explicit settings still win (and then a mismatch is reported as such).
    with pytest.raises(CheckpointError, match=r"use shortcut 'B'"):
        create_model(ModelConfig(arch="cifar_resnet20", weights=str(tmp_path / "b100.pth"), shortcut="A"))
    # The akamaster teacher (option A) copied under another name: detected as A from its keys too.
    shutil.copyfile(teacher_path, tmp_path / "teacher.th")
    assert resolve_model_config(ModelConfig(weights=str(tmp_path / "teacher.th"))).shortcut == "A"


def test_a_student_checkpoint_is_not_a_teacher(tmp_path: Path) -> None:
    from intraq_core.config import QuantConfig
    from intraq_core.quant import calibrate_ranges, quantize
    from intraq_core.student import save_student

    cfg = resolve_model_config(ModelConfig())
    student = quantize(create_model(cfg), QuantConfig())
    calibrate_ranges(student, [torch.randn(4, 3, 32, 32)])
    path = save_student(tmp_path / "student.pt", student, cfg, QuantConfig())
    with pytest.raises(CheckpointError, match=r"is a quantized student, not a float model"):
        resolve_model_config(ModelConfig(arch=str(path)))
    with pytest.raises(CheckpointError, match=r"is a quantized student"):
        resolve_model_config(ModelConfig(weights=str(path)))
