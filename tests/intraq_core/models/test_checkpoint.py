"""Checkpoint loading: weights_only only, wrappers/prefixes, layout adaptation, mismatch errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn

from intraq_core.models import (
    CheckpointError,
    CheckpointMismatchError,
    cifar_resnet,
    is_model_checkpoint,
    load_state_dict_file,
    load_weights,
    read_model_checkpoint,
    save_model_checkpoint,
)


class _Custom:
    """Any user class: unpickling it needs arbitrary code, so weights_only refuses it."""

    def __init__(self) -> None:
        self.value = 3


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics so that a wrong mapping changes the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _torchvision_style(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.replace("linear.", "fc.", 1).replace(".shortcut.", ".downsample."): v for k, v in sd.items()}


def test_torchvision_layout_loads_into_option_b(tmp_path: Path) -> None:
    src = _randomize_bn(cifar_resnet(20, shortcut="B"))
    sd = _torchvision_style(src.state_dict())
    assert "fc.weight" in sd and "layer2.0.downsample.0.weight" in sd
    torch.save(sd, tmp_path / "tv.pt")
    dst = load_weights(cifar_resnet(20, shortcut="B"), tmp_path / "tv.pt").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_akamaster_layout_loads_into_torchvision_names() -> None:
    src = _randomize_bn(torchvision.models.resnet18(num_classes=10))
    sd = {k.replace("fc.", "linear.", 1).replace(".downsample.", ".shortcut."): v for k, v in src.state_dict().items()}
    dst = load_weights(torchvision.models.resnet18(num_classes=10), sd).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict", "net"])
def test_wrappers_and_module_prefix(tmp_path: Path, wrapper: str | None) -> None:
    src = _randomize_bn(cifar_resnet(20))
    sd = {f"module.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    obj = sd if wrapper is None else {wrapper: sd, "epoch": 3, "best_prec1": 91.0}
    torch.save(obj, tmp_path / "ck.pt")
    loaded = load_state_dict_file(tmp_path / "ck.pt")
    assert set(loaded) == {k.removeprefix("module.") for k in sd}
    dst = load_weights(cifar_resnet(20), tmp_path / "ck.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_weights_only_refusal(tmp_path: Path) -> None:
    torch.save({"state_dict": cifar_resnet(20).state_dict(), "extra": _Custom()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refused to load .*weights_only") as info:
        load_state_dict_file(tmp_path / "evil.pt")
    assert "_Custom" in str(info.value)
    with pytest.raises(CheckpointError, match=r"refused"):
        load_weights(cifar_resnet(20), tmp_path / "evil.pt")


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match=r"could not read"):
        load_state_dict_file(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match=r"file not found"):
        load_state_dict_file(tmp_path / "absent.pt")
    torch.save({"epoch": 1, "optimizer": {"lr": 0.1}}, tmp_path / "nosd.pt")
    with pytest.raises(CheckpointError, match=r"no state_dict found.*epoch"):
        load_state_dict_file(tmp_path / "nosd.pt")


def _sd() -> dict[str, Tensor]:
    return dict(cifar_resnet(20).state_dict())


def test_mismatch_missing_key() -> None:
    sd = _sd()
    del sd["layer2.1.bn1.running_var"]
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key\(s\) \[layer2.1.bn1.running_var\]") as info:
        load_weights(cifar_resnet(20), sd)
    assert info.value.missing == ["layer2.1.bn1.running_var"]
    assert info.value.unexpected == [] and info.value.mismatched == []


def test_mismatch_unexpected_key() -> None:
    sd = _sd()
    sd["head.extra"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected key\(s\) \[head.extra\]"):
        load_weights(cifar_resnet(20), sd)


def test_mismatch_shape_with_num_classes_hint() -> None:
    sd = dict(cifar_resnet(20, num_classes=100).state_dict())
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(cifar_resnet(20, num_classes=10), sd)
    msg = str(info.value)
    assert "2 shape mismatch(es)" in msg
    assert "linear.weight: checkpoint [100, 64] vs model [10, 64]" in msg
    assert "100 classes" in msg


def test_mismatch_lists_are_truncated_with_counts() -> None:
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(cifar_resnet(56), _sd())
    err = info.value
    assert len(err.missing) == 18 * 10  # 18 extra blocks x (2 conv weights + 2 BN x 4 tensors)
    assert f"{len(err.missing)} missing key(s)" in str(err)
    assert f"(+{len(err.missing) - 8} more)" in str(err)


def test_shortcut_option_hints(teacher_path: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"use shortcut 'A'"):
        load_weights(cifar_resnet(20, shortcut="B"), teacher_path)
    with pytest.raises(CheckpointMismatchError, match=r"use shortcut 'B'"):
        load_weights(cifar_resnet(20, shortcut="A"), dict(cifar_resnet(20, shortcut="B").state_dict()))


def test_missing_num_batches_tracked_is_fine(teacher_path: Path) -> None:
    sd = load_state_dict_file(teacher_path)
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    load_weights(cifar_resnet(20), sd)


def test_project_checkpoint_format(tmp_path: Path) -> None:
    model = _randomize_bn(cifar_resnet(20, shortcut="B"))
    path = save_model_checkpoint(
        tmp_path / "sub" / "m.pt",
        model,
        {"arch": "cifar_resnet20", "shortcut": "B", "mean": (0.5, 0.5, 0.5)},
        extra={"bits": (4, 4), "source": tmp_path, "stat": torch.ones(2)},
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]  # atomic write, no temp left
    ck = read_model_checkpoint(path)
    assert ck["format"] == "intraq-model/1" and ck["quant_config"] is None
    assert ck["model_config"] == {
        "arch": "cifar_resnet20",
        "weights": None,
        "kwargs": {},
        "num_classes": 10,
        "shortcut": "B",
        "image_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.247, 0.2435, 0.2616],
        "output": None,
        # CIFAR-size inputs: no resize of real images (the model spec's preprocessing).
        "resize": None,
        "crop_pct": None,
        "interpolation": None,
    }
    assert ck["extra"]["bits"] == [4, 4] and ck["extra"]["source"] == str(tmp_path)
    assert is_model_checkpoint(path)
    assert not is_model_checkpoint(tmp_path / "absent.pt")
    torch.testing.assert_close(load_state_dict_file(path), model.state_dict())
    with pytest.raises(TypeError, match=r"extra.obj"):
        save_model_checkpoint(tmp_path / "bad.pt", model, {"shortcut": "B"}, extra={"obj": _Custom()})


def test_plain_state_dict_is_not_a_project_checkpoint(teacher_path: Path, tmp_path: Path) -> None:
    assert not is_model_checkpoint(teacher_path)
    with pytest.raises(CheckpointError, match=r"not an intraq-pipeline model checkpoint"):
        read_model_checkpoint(teacher_path)
    torch.save(cifar_resnet(20).state_dict(), tmp_path / "plain.pt")
    assert not is_model_checkpoint(tmp_path / "plain.pt")
