"""CIFAR ResNets: parameter counts, structure for quantization, fx tracing, the real teacher."""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from intraq_core.config import IMAGENET_MEAN, IMAGENET_STD
from intraq_core.models import CifarResNet, PadShortcut, cifar_resnet, load_state_dict_file, load_weights

# Exact parameter counts (akamaster README: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M).
PARAMS_A = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}
# Option B adds three 1x1 convs + BN... only at the two stage transitions: 16->32 and 32->64.
PARAMS_B_EXTRA = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", sorted(PARAMS_A))
def test_param_counts(depth: int) -> None:
    assert n_params(cifar_resnet(depth)) == PARAMS_A[depth]
    assert n_params(cifar_resnet(depth, shortcut="B")) == PARAMS_A[depth] + PARAMS_B_EXTRA


def test_rejects_bad_depth_and_option() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(21)
    with pytest.raises(ValueError, match="'A' or 'B'"):
        cifar_resnet(20, shortcut="C")  # type: ignore[arg-type]


def test_module_names_and_shortcuts() -> None:
    a = cifar_resnet(20)
    names = set(dict(a.named_modules()))
    assert {"conv1", "bn1", "relu", "layer3.2.bn2", "layer2.0.shortcut", "linear", "avgpool"} <= names
    assert isinstance(a.layer2[0].shortcut, PadShortcut)
    assert isinstance(a.layer1[0].shortcut, nn.Identity)
    assert not any(".shortcut" in k for k in a.state_dict())
    b = cifar_resnet(20, shortcut="B")
    assert {"layer2.0.shortcut.0.weight", "layer3.0.shortcut.1.running_var"} <= set(b.state_dict())


def test_every_relu_is_its_own_module() -> None:
    model = cifar_resnet(20)
    relus = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 9
    assert len({id(m) for m in relus}) == len(relus)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_fx_traceable(shortcut: str) -> None:
    model = cifar_resnet(20, num_classes=10, shortcut=shortcut).eval()  # type: ignore[arg-type]
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(gm(x), model(x))
    relu_nodes = [
        n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)
    ]
    assert len(relu_nodes) == 19
    assert len({n.target for n in relu_nodes}) == 19
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add) == 9
    assert not any(n.op == "call_function" and n.target in (F.relu, torch.relu) for n in gm.graph.nodes)


def test_output_shape_and_kaiming_init() -> None:
    model = cifar_resnet(32, num_classes=100)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 100)
    w = model.layer3[0].conv1.weight
    fan_in = w[0].numel()
    assert abs(w.std().item() - (2.0 / fan_in) ** 0.5) < 0.01


# --- the real shared teacher -------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(teacher_path: Path) -> CifarResNet:
    model = cifar_resnet(20, num_classes=10, shortcut="A")
    load_weights(model, teacher_path)
    return model.eval()


@pytest.fixture(scope="module")
def test_set(cifar10_test_path: Path) -> tuple[Tensor, Tensor]:
    with np.load(cifar10_test_path) as d:
        images, labels = d["images"], d["labels"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(labels)


def functional_resnet20(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    """The akamaster ResNet-20 written out with torch.nn.functional, as an independent reference."""

    def bn(t: Tensor, p: str) -> Tensor:
        return F.batch_norm(
            t,
            sd[f"{p}.running_mean"],
            sd[f"{p}.running_var"],
            sd[f"{p}.weight"],
            sd[f"{p}.bias"],
            False,
            0.0,
            1e-5,
        )

    out = F.relu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"))
    for stage, planes in ((1, 16), (2, 32), (3, 64)):
        for i in range(3):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            y = F.relu(bn(F.conv2d(out, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            y = bn(F.conv2d(y, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            short = out if stride == 1 else F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            out = F.relu(y + short)
    return F.linear(out.mean(dim=(2, 3)), sd["linear.weight"], sd["linear.bias"])


def test_teacher_loads_strictly(teacher: CifarResNet, teacher_path: Path) -> None:
    sd = load_state_dict_file(teacher_path)
    assert len(sd) == 97 and all(not k.startswith("module.") for k in sd)
    assert n_params(teacher) == 269_722
    torch.testing.assert_close(teacher.linear.weight, sd["linear.weight"])


def test_teacher_matches_functional_forward(teacher: CifarResNet, teacher_path, test_set) -> None:
    x = test_set[0][:500]
    sd = load_state_dict_file(teacher_path)
    with torch.no_grad():
        ours, ref = teacher(x), functional_resnet20(sd, x)
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# The published 91.73% on all 10,000 test images is checked end to end, through the CLI's evaluate
# command, in tests/pipeline/test_cli_local.py (one full pass of the test set in the suite, not two).
