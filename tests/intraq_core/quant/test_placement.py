"""Activation placement at the weight layers' inputs (``quant.act_placement``) and the quantization map.

Hand-built graphs with every kind of producer: the expected quantizers are written out per
layer, so a placement that misses one input (the LeakyReLU network that got zero activation
quantizers), shares one wrongly, or picks the wrong sign fails here.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from intraq_core.config import ModelConfig, QuantConfig
from intraq_core.errors import QuantizationError
from intraq_core.models import create_model, resolve_model_config
from intraq_core.quant import (
    QuantConv2d,
    QuantizationWarning,
    act_quantizers,
    calibrate_ranges,
    format_quant_map,
    quant_map,
    quantize,
    set_act_mode,
    weight_quantized_layers,
)


class AnyActs(nn.Module):
    """LeakyReLU, PReLU, ELU, Mish, two convs with nothing between them, a max-pool of a ReLU,
    one tensor feeding two convs, a residual add, a functional avg-pool before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.LeakyReLU(0.1, inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.PReLU()
        self.c3 = nn.Conv2d(8, 8, 1)  # no activation after it: c4 reads its raw output
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.c5 = nn.Conv2d(8, 8, 1)
        self.c6 = nn.Conv2d(8, 8, 1)
        self.c7 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.c1(x)))
        x = self.act2(self.c2(x))
        x = self.c4(self.c3(x))
        x = F.elu(x)
        y = self.c5(x) + self.c6(x)  # x feeds two convs: one quantizer; the add is their sum
        y = F.max_pool2d(torch.relu(y), 2)  # max-pool of a ReLU: unsigned, quantized before the pool
        y = F.mish(self.c7(y))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_every_weight_layer_but_the_first_reads_a_quantized_tensor() -> None:
    q = quantize(AnyActs().eval(), QuantConfig(w_bits=4, a_bits=3))
    inputs = {row["layer"]: row["input"] for row in quant_map(q)["layer_inputs"]}
    assert inputs == {
        "c1": "image (float: quant.quantize_input=false)",
        "c2": "act_quant.act1 (3-bit, signed)",  # LeakyReLU dips below zero
        "c3": "act_quant.act2 (3-bit, signed)",  # PReLU
        "c4": "act_quant.c3 (3-bit, signed)",  # a conv output with no activation
        "c5": "act_quant.elu (3-bit, signed)",
        "c6": "act_quant.elu (3-bit, signed)",  # the same tensor: the same quantizer
        "c7": "act_quant.relu (3-bit, unsigned)",  # through the max-pool, to the ReLU
        "fc": "act_quant.mish (3-bit, signed)",  # through pooling and flatten, to the Mish
    }
    assert list(act_quantizers(q)) == [
        "act_quant.act1",
        "act_quant.act2",
        "act_quant.c3",
        "act_quant.elu",
        "act_quant.relu",
        "act_quant.mish",
    ]
    qmap = quant_map(q)
    assert qmap["weight_layers"] == {"quantized": 8, "bits": {"4": 8}, "float": []}
    assert qmap["activations"]["quantized"] == 6 and qmap["activations"]["unsigned"] == 1


def _input_levels(q: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Number of distinct values each weight layer reads on ``x``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, name=name: seen.__setitem__(name, a[0]))
        for name, m in weight_quantized_layers(q).items()
    ]
    with torch.no_grad():
        q(x)
    for h in hooks:
        h.remove()
    return {name: v.unique().numel() for name, v in seen.items()}


def test_the_quantizers_act_on_every_layer_input() -> None:
    """Values reaching each weight layer lie on its input quantizer's grid (at most 2^bits levels)."""
    torch.manual_seed(0)
    q = quantize(AnyActs().eval(), QuantConfig(w_bits=8, a_bits=2))
    gen = torch.Generator().manual_seed(0)
    calibrate_ranges(q, [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(2)])
    x = torch.randn(4, 3, 8, 8, generator=gen)
    levels = _input_levels(q, x)
    assert levels.pop("c1") > 100  # the image is not quantized (quantize_input=false)
    levels.pop("fc")  # a spatial mean of the Mish grid (an integer target rounds it back onto it)
    assert all(n <= 4 for n in levels.values()), levels  # 2-bit grids: 4 levels
    set_act_mode(q, "off")  # the same inputs without the quantizers take many values
    off = _input_levels(q, x)
    assert all(off[name] > 16 for name in levels), off


def test_after_activations_is_the_reference_placement_and_misses_raw_conv_outputs() -> None:
    q = quantize(AnyActs().eval(), QuantConfig(act_placement="after_activations"))
    inputs = {row["layer"]: row["input"] for row in quant_map(q)["layer_inputs"]}
    assert inputs["c4"].startswith("float")  # c3's output reaches c4 unquantized
    assert "act_quant.c3" not in act_quantizers(q)


@pytest.mark.parametrize(
    ("arch", "weights"),
    [("cifar_resnet20", "cifar10-resnet20"), ("cifar_resnet20", "cifar10-resnet20-chenyaofo")],
)
def test_cifar_resnets_get_the_same_quantizers_under_both_placements(data_dir: Path, arch: str, weights: str) -> None:
    """The IntraQ/SynQ tables' protocol (quantizers after the ReLUs) is what the default gives on
    ResNets: same modules, same state-dict keys, same generated code (so the same numbers)."""
    teacher = create_model(resolve_model_config(ModelConfig(arch=arch, weights=weights))).eval()
    a = quantize(teacher, QuantConfig(act_placement="weight_inputs"))
    b = quantize(teacher, QuantConfig(act_placement="after_activations"))
    assert list(a.state_dict()) == list(b.state_dict())
    assert {n: m.signed for n, m in act_quantizers(a).items()} == {n: m.signed for n, m in act_quantizers(b).items()}
    assert a.code == b.code
    assert len(act_quantizers(a)) == 19


def test_shared_imagenet_mobilenet_gets_a_quantizer_on_every_layer_input_but_the_first(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = data_dir / "imagenet"
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("mobilenetv1_025", None)
    cfg = ModelConfig(
        arch="mobilenetv1_025:MobileNetV1",
        weights=str(folder / "mobilenetv1_025_imagenet.pth"),
        num_classes=1000,
        image_size=224,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    teacher = create_model(cfg).eval()
    qmap = quant_map(quantize(teacher, QuantConfig(w_bits=4, a_bits=4)))
    assert qmap["weight_layers"]["quantized"] == 28
    rows = qmap["layer_inputs"]
    assert rows[0]["input"].startswith("image")
    assert all(r["input"].startswith("act_quant.") and "4-bit, signed" in r["input"] for r in rows[1:])
    assert qmap["activations"]["quantized"] == 27
    # The 13 depthwise convs' inputs (the stem's output and every pointwise output) are per channel.
    depthwise = [r for r in rows if "per channel" in r["input"]]
    assert len(depthwise) == qmap["activations"]["per_channel"] == 13
    assert all(teacher.get_submodule(r["layer"]).groups > 1 for r in depthwise)
    per_tensor = quant_map(quantize(teacher, QuantConfig(w_bits=4, a_bits=4, depthwise_act_per_channel=False)))
    assert per_tensor["activations"]["per_channel"] == 0
    # The reference placement would have found the LeakyReLUs too (they are activation sites now).
    legacy = quant_map(quantize(teacher, QuantConfig(act_placement="after_activations")))
    assert legacy["activations"]["quantized"] == 27


class StdConv(nn.Conv2d):
    """A user subclass with the standard forward: quantized like any conv."""


class PaddedConv(nn.Conv2d):
    """A subclass with its own forward (like timm's Conv2dSame): cannot be swapped safely."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


class Subclassed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = StdConv(3, 4, 3)
        self.b = PaddedConv(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b(F.relu(self.a(x))))
        return self.fc(x.mean((2, 3)))


def test_conv_subclasses_are_quantized_and_custom_forwards_are_named() -> None:
    with pytest.warns(QuantizationWarning, match=r"1 layer\(s\) left in float: b: PaddedConv overrides forward"):
        q = quantize(Subclassed().eval(), QuantConfig())
    assert isinstance(q.a, QuantConv2d)
    assert set(weight_quantized_layers(q)) == {"a", "fc"}
    assert quant_map(q)["weight_layers"]["float"] == [
        {"name": "b", "reason": "PaddedConv overrides forward() (only the standard conv/linear forward is quantized)"}
    ]
    # The float layer's output still gets its quantizer where the fc reads it.
    assert quant_map(q)["layer_inputs"][-1]["input"] == "act_quant.relu_1 (4-bit, unsigned)"


def test_conv1d_is_quantized() -> None:
    net = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.GELU(), nn.Conv1d(4, 4, 1), nn.Flatten(), nn.Linear(12, 2)
    )
    q = quantize(net.eval(), QuantConfig(w_bits=3))
    assert len(weight_quantized_layers(q)) == 3
    assert [r["input"] for r in quant_map(q)["layer_inputs"]][1:] == [
        "act_quant._2 (4-bit, signed)",
        "act_quant._3 (4-bit, signed)",
    ]
    x = torch.randn(4, 2, 5)
    calibrate_ranges(q, [x])
    w = q.get_submodule("0").weight
    assert q.get_submodule("0").weight_quant(w).detach().unique().numel() <= 4 * 2**3


def test_activation_bits_on_a_model_with_no_quantizable_activation_are_refused() -> None:
    one_layer = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(QuantizationError) as err:
        quantize(one_layer.eval(), QuantConfig(a_bits=4))
    message = str(err.value)
    assert "\n" not in message and "quant.a_bits=4" in message and "quant.quantize_input=true" in message
    with pytest.raises(QuantizationError, match="no Conv1d/Conv2d/Linear"):
        quantize(nn.Sequential(nn.ReLU()).eval(), QuantConfig())


def test_signed_only_where_the_producer_can_be_negative() -> None:
    class Sums(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.c4 = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = F.relu(self.c1(x))  # read by the add and the sigmoid only: no quantizer of its own
            b = self.c2(a + torch.sigmoid(a))  # ReLU + sigmoid >= 0: unsigned
            c = self.c3(torch.cat([F.relu6(b), torch.tanh(b)], 1)[:, :4])  # tanh < 0: signed
            return self.c4(F.hardtanh(c, 0.0, 1.0))  # hardtanh clamped at 0: unsigned

    q = quantize(Sums().eval(), QuantConfig())
    signed = {n: m.signed for n, m in act_quantizers(q).items()}
    assert signed == {
        "act_quant.add": False,
        "act_quant.cat": True,
        "act_quant.hardtanh": False,
    }


def test_quantize_input_quantizes_the_image_of_the_first_layer() -> None:
    q = quantize(AnyActs().eval(), QuantConfig(quantize_input=True, input_bits=8))
    assert quant_map(q)["layer_inputs"][0]["input"] == "image (8-bit by act_quant.x)"
    assert quant_map(q)["activations"]["image"] is True


def test_last_input_bits_and_first_last_protocol_in_the_map() -> None:
    cfg = QuantConfig(w_bits=4, a_bits=4, first_layer_bits=8, last_layer_bits=8, last_input_bits=8)
    q = quantize(AnyActs().eval(), cfg)
    qmap = quant_map(q)
    assert qmap["weight_layers"]["bits"] == {"4": 6, "8": 2}
    assert qmap["layer_inputs"][-1] == {
        "layer": "fc",
        "input": "act_quant.mish (8-bit, signed)",
        "input_bits": 8,
        "bits": 8,
    }
    assert qmap["activations"]["bits"] == {"4": 5, "8": 1}
    text = format_quant_map(qmap)
    assert text.splitlines()[0].startswith("weights: 8 layer(s) quantized (6 at 4-bit, 2 at 8-bit), 0 left float")
    assert "  fc (W8): input act_quant.mish (8-bit, signed)" in text.splitlines()


def test_map_survives_deepcopy_and_is_absent_from_float_models() -> None:
    import copy

    q = quantize(AnyActs().eval(), QuantConfig())
    assert quant_map(copy.deepcopy(q)) == quant_map(q)
    with pytest.raises(ValueError, match="not built by"):
        quant_map(AnyActs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no float layer: no warning
        quantize(AnyActs().eval(), QuantConfig())


class Depthwise(nn.Module):
    """A depthwise conv reading one tensor alone, and one sharing its input with a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.dw1 = nn.Conv2d(6, 12, 3, padding=1, groups=6)  # depth multiplier 2
        self.pw1 = nn.Conv2d(12, 6, 1)
        self.dw2 = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw2 = nn.Conv2d(6, 6, 1)  # reads the same tensor as dw2
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.stem(x), 0.1)
        x = torch.relu(self.pw1(F.relu6(self.dw1(F.pad(x, (1, 1, 1, 1))))))
        x = self.dw2(x) + self.pw2(x)
        return self.fc(x.mean((2, 3)))


def test_depthwise_inputs_get_one_range_per_channel_only_when_every_reader_is_depthwise() -> None:
    q = quantize(Depthwise().eval(), QuantConfig(w_bits=8, a_bits=8))
    quants = act_quantizers(q)
    assert {n: m.channels for n, m in quants.items()} == {
        "act_quant.leaky_relu": 6,  # read by dw1 alone (through the zero padding)
        "act_quant.relu6": None,
        "act_quant.relu": None,  # read by dw2 and the 1x1 pw2: one per-tensor grid
        "act_quant.add": None,
    }
    gen = torch.Generator().manual_seed(0)
    calibrate_ranges(q, [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)])
    lo, hi = quants["act_quant.leaky_relu"].range()
    assert lo.shape == hi.shape == (6,) and bool((hi > lo).all())
    inputs = {r["layer"]: r["input"] for r in quant_map(q)["layer_inputs"]}
    assert inputs["dw1"] == "act_quant.leaky_relu (8-bit, signed, per channel ×6)"
    assert "per channel" not in inputs["dw2"]
    assert "1 per channel (depthwise inputs)" in format_quant_map(quant_map(q))
