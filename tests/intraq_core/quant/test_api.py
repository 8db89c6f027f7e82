"""``quantize()`` placement, options, calibration and round trips, on small local nets and torchvision."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from intraq_core.config import QuantConfig
from intraq_core.errors import QuantizationError
from intraq_core.quant import (
    ActFakeQuant,
    QuantConv2d,
    QuantLinear,
    act_quantizers,
    calibrate_ranges,
    quant_map,
    quant_summary,
    quantize,
    set_act_mode,
    weight_quantized_layers,
)


class ResNetish(nn.Module):
    """conv-bn-relu stem, one residual block (add then relu), pooled Linear head."""

    def __init__(self, width: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(x)))
        out = self.bn3(self.conv3(out))
        out = self.relu3(out + x)
        return self.fc(torch.flatten(self.pool(out), 1))


class SharedReluNet(nn.Module):
    """One nn.ReLU module called twice (like torchvision's BasicBlock) plus functional ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))  # call site 1 of self.relu
        y = self.relu(self.conv2(x))  # call site 2 of self.relu
        z = F.relu(self.conv3(y) + x)  # functional
        z = torch.relu(z * 2.0)  # torch.relu
        z = z.relu() + F.relu6(z - 1.0)  # Tensor.relu, F.relu6 (the add is a residual add)
        h = z.size(2) + z.size(3)  # an add of two ints: never quantized
        return self.fc(z.mean(dim=(2, 3)) / h)


class InplaceDiscardNet(nn.Module):
    """An in-place ReLU whose result is discarded: later reads of its input must be quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        F.relu(y, inplace=True)
        return y


def cfg(**kw) -> QuantConfig:
    return QuantConfig(**kw)


def calib_batches(n: int = 3, size: int = 16, batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


# ---------------------------------------------------------------- placement


def test_local_resnetish_placement():
    q = quantize(ResNetish(), cfg())
    assert set(weight_quantized_layers(q)) == {"conv1", "conv2", "conv3", "fc"}
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.fc, QuantLinear)
    assert isinstance(q.conv1, nn.Conv2d) and isinstance(q.fc, nn.Linear)
    assert isinstance(q.bn1, nn.BatchNorm2d) and type(q.bn1) is nn.BatchNorm2d
    assert list(act_quantizers(q)) == ["act_quant.relu1", "act_quant.relu2", "act_quant.relu3"]
    assert all(m.bits == 4 and m.mode == "calibrate" for m in act_quantizers(q).values())
    assert all(m.weight_quant.bits == 4 for m in weight_quantized_layers(q).values())
    assert q.training and all(m.training for m in q.modules())
    assert not any(m.training for m in quantize(ResNetish().eval(), cfg()).modules())


def test_shared_relu_gets_one_quantizer_per_call_site():
    q = quantize(SharedReluNet(), cfg(a_bits=3, act_placement="after_activations"))
    names = list(act_quantizers(q))
    # 2 call sites of self.relu + F.relu + torch.relu + Tensor.relu + F.relu6.
    assert names == [
        "act_quant.relu",
        "act_quant.relu_1",
        "act_quant.relu_2",
        "act_quant.relu_3",
        "act_quant.relu_4",
        "act_quant.relu6",
    ]
    assert len({id(m) for m in act_quantizers(q).values()}) == 6
    calibrate_ranges(q, calib_batches(2))
    ranges = [tuple(float(v) for v in m.range()) for m in act_quantizers(q).values()]
    assert ranges[0] != ranges[1]  # the shared module's two sites have separate ranges
    # Residual option: the two tensor additions (conv3 + x, relu + relu6), not the int add.
    qr = quantize(SharedReluNet(), cfg(quantize_residual=True, act_placement="after_activations"))
    assert sorted(set(act_quantizers(qr)) - set(names)) == ["act_quant.add", "act_quant.add_1"]


def test_first_last_and_symmetric_bits():
    q = quantize(ResNetish(), cfg(w_bits=4, first_layer_bits=8, last_layer_bits=6, weight_symmetric=True))
    bits = {name: m.weight_quant.bits for name, m in weight_quantized_layers(q).items()}
    assert bits == {"conv1": 8, "conv2": 4, "conv3": 4, "fc": 6}
    assert all(m.weight_quant.symmetric for m in weight_quantized_layers(q).values())
    q = quantize(ResNetish(), cfg(w_bits=3, last_layer_bits=8))
    bits = {name: m.weight_quant.bits for name, m in weight_quantized_layers(q).items()}
    assert bits == {"conv1": 3, "conv2": 3, "conv3": 3, "fc": 8}
    single = quantize(
        nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), cfg(first_layer_bits=8, last_layer_bits=6, quantize_input=True)
    )
    assert single.get_submodule("1").weight_quant.bits == 8


def test_last_input_bits_set_the_quantizers_that_feed_the_last_layer():
    # ResNetish: relu3 → pool → flatten → fc; relu1 also reaches fc, but only through conv2/conv3
    # (and the residual add goes through relu3), so only relu3 is the last layer's input.
    q = quantize(ResNetish(), cfg(a_bits=4, last_input_bits=8))
    bits = {name: m.bits for name, m in act_quantizers(q).items()}
    assert bits == {"act_quant.relu1": 4, "act_quant.relu2": 4, "act_quant.relu3": 8}
    # With the residual add quantized, relu3 is still the one that feeds the head.
    q = quantize(ResNetish(), cfg(a_bits=3, last_input_bits=8, quantize_residual=True))
    bits = {name: m.bits for name, m in act_quantizers(q).items()}
    assert bits == {"act_quant.relu1": 3, "act_quant.relu2": 3, "act_quant.add": 3, "act_quant.relu3": 8}
    # A plain conv-ReLU-Linear stack: its one activation quantizer is the head's input.
    head_on_add = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    q = quantize(head_on_add, cfg(last_input_bits=8))
    assert [m.bits for m in act_quantizers(q).values()] == [8]


def test_act_bits_set_named_quantizers_over_a_bits_and_last_input_bits_and_refuse_unknown_names():
    q = quantize(ResNetish(), cfg(a_bits=4, last_input_bits=8, act_bits={"act_quant.relu1": 6, "act_quant.relu3": 3}))
    bits = {name: m.bits for name, m in act_quantizers(q).items()}
    assert bits == {"act_quant.relu1": 6, "act_quant.relu2": 4, "act_quant.relu3": 3}
    assert quant_map(q)["activations"]["bits"] == {"3": 1, "4": 1, "6": 1}
    with pytest.raises(QuantizationError, match=r"quant.act_bits names act_quant.relu9, which ResNetish does not have"):
        quantize(ResNetish(), cfg(act_bits={"act_quant.relu9": 8}))


def test_input_and_residual_options():
    q = quantize(ResNetish(), cfg(quantize_input=True, input_bits=8, quantize_residual=True, a_bits=3))
    quants = act_quantizers(q)
    assert list(quants) == [
        "act_quant.x",
        "act_quant.relu1",
        "act_quant.relu2",
        "act_quant.add",
        "act_quant.relu3",
    ]
    assert quants["act_quant.x"].bits == 8 and quants["act_quant.add"].bits == 3
    x = calib_batches(1)[0]
    calibrate_ranges(q, [x])
    lo, hi = quants["act_quant.x"].range()
    torch.testing.assert_close((lo, hi), torch.aminmax(x))


def test_inplace_relu_result_discarded_still_quantized():
    torch.manual_seed(0)
    q = quantize(InplaceDiscardNet(), cfg(a_bits=2, act_placement="after_activations"))
    assert list(act_quantizers(q)) == ["act_quant.relu"]
    x = torch.randn(2, 3, 8, 8)
    calibrate_ranges(q, [x])
    out = q(x)
    assert out.min() >= 0 and out.unique().numel() <= 4


def test_torchvision_resnet18(resnet18):
    q = quantize(resnet18, cfg())
    layers = weight_quantized_layers(q)
    assert len(layers) == 21  # 1 stem + 16 block convs + 3 downsample convs + fc
    assert sum(".downsample." in name for name in layers) == 3
    assert len(act_quantizers(q)) == 17  # stem + 2 call sites of the shared ReLU in 8 blocks
    assert "act_quant.layer1_0_relu_1" in act_quantizers(q)
    qr = quantize(resnet18, cfg(quantize_residual=True, quantize_input=True))
    assert len(act_quantizers(qr)) == 17 + 8 + 1


def test_torchvision_mobilenet_v2():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    q = quantize(model, cfg(quantize_residual=True, act_placement="after_activations"))
    # ReLU6: stem + 1 in the t=1 block + 2 in each of the 16 others + last 1x1 conv = 35;
    # 10 residual adds. Convs: 1 + 2 + 16·3 + 1 = 52, plus the classifier Linear.
    quants = act_quantizers(q)
    assert sum("add" in name for name in quants) == 10
    assert len(quants) == 35 + 10
    assert len(weight_quantized_layers(q)) == 53
    # At the weight layers' inputs: one quantizer per layer but the stem (the image), 52; the
    # projection convs (no activation) and the 10 residual adds feed the next block's conv, so
    # they are among them (signed: a projection's output and a sum of two can be negative).
    q = quantize(model, cfg())
    quants = act_quantizers(q)
    assert len(quants) == 52
    assert sum("add" in name for name in quants) == 10
    # Signed: the 10 adds and the 7 projection outputs that feed a conv without an add; the
    # 35 ReLU6 outputs are unsigned.
    assert sum(qt.signed for qt in quants.values()) == 17
    assert sum(not qt.signed for qt in quants.values()) == 35
    x = torch.randn(2, 3, 32, 32)
    assert calibrate_ranges(q, [x]) == 1
    assert q(x).shape == (2, 10)


# ---------------------------------------------------------------- numerics


def test_w8a8_close_w2a2_far(resnet18):
    batches = calib_batches(2, size=32, batch=4)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = resnet18(x)
        q8 = quantize(resnet18, cfg(w_bits=8, a_bits=8))
        calibrate_ranges(q8, batches)
        q2 = quantize(resnet18, cfg(w_bits=2, a_bits=2))
        calibrate_ranges(q2, batches)
        err8, err2 = rel_err(q8(x), ref), rel_err(q2(x), ref)
    assert err8 < 0.05, err8
    assert err2 > 0.3, err2
    assert err2 > 10 * err8


def test_local_net_w8a8_close():
    torch.manual_seed(0)
    model = ResNetish().eval()
    x = torch.randn(8, 3, 16, 16)
    q = quantize(model, cfg(w_bits=8, a_bits=8, quantize_input=True, quantize_residual=True))
    calibrate_ranges(q, [x])
    with torch.no_grad():
        assert rel_err(q(x), model(x)) < 0.03


def test_gradients_reach_input_and_weights():
    torch.manual_seed(0)
    q = quantize(ResNetish(), cfg(w_bits=4, a_bits=4))
    calibrate_ranges(q, calib_batches(2))
    q.train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    q(x).logsumexp(dim=1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, layer in weight_quantized_layers(q).items():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- copies, state dicts


def test_original_untouched_and_nothing_shared(resnet18):
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    types = [type(m) for m in resnet18.modules()]
    q = quantize(resnet18, cfg())
    calibrate_ranges(q, calib_batches(1, size=32))
    with torch.no_grad():
        for p in q.parameters():
            p.add_(1.0)
    assert [type(m) for m in resnet18.modules()] == types
    after = resnet18.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert resnet18.conv1.weight.data_ptr() != q.conv1.weight.data_ptr()


def test_state_dict_keys_and_round_trip():
    torch.manual_seed(0)
    model = ResNetish()
    config = cfg(w_bits=3, a_bits=3, quantize_residual=True, quantize_input=True)
    q = quantize(model, config)
    calibrate_ranges(q, calib_batches(3))
    state = q.state_dict()
    extra = set(state) - set(model.state_dict())
    assert set(model.state_dict()) <= set(state)
    assert extra and all(k.startswith("act_quant.") for k in extra)

    torch.manual_seed(1)
    fresh = quantize(ResNetish(), config)  # different random weights, uncalibrated
    fresh.load_state_dict(state)
    assert all(m.mode == "frozen" for m in act_quantizers(fresh).values())
    q.eval()
    fresh.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))


def test_deepcopy_preserves_state_and_output(resnet18):
    q = quantize(resnet18, cfg())
    calibrate_ranges(q, calib_batches(1, size=32))
    dup = copy.deepcopy(q)
    assert all(m.mode == "frozen" for m in act_quantizers(dup).values())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dup(x), q(x))
    dup.conv1.weight.data.zero_()
    assert q.conv1.weight.abs().sum() > 0


# ---------------------------------------------------------------- helpers


def test_calibrate_counts_freezes_and_restores_mode():
    model = quantize(ResNetish(), cfg())
    model.train()
    batches = [(b, torch.zeros(4, dtype=torch.long)) for b in calib_batches(3)]
    assert calibrate_ranges(model, batches) == 3
    assert model.training and model.bn1.training
    assert int(model.bn1.num_batches_tracked) == 0  # ran in eval mode
    for quant in act_quantizers(model).values():
        assert quant.mode == "frozen" and int(quant.num_updates) == 3
    assert calibrate_ranges(model, calib_batches(1), freeze=False) == 1
    assert all(m.mode == "calibrate" and int(m.num_updates) == 4 for m in act_quantizers(model).values())


def test_set_act_mode():
    torch.manual_seed(0)
    float_model = ResNetish().eval()
    model = quantize(float_model, cfg(w_bits=3))
    with pytest.raises(RuntimeError, match=r"3 activation quantizer\(s\) were never calibrated.*act_quant.relu1"):
        set_act_mode(model, "frozen")
    with pytest.raises(ValueError, match="unknown"):
        set_act_mode(model, "fixed")
    set_act_mode(model, "dynamic")
    assert {m.mode for m in act_quantizers(model).values()} == {"dynamic"}
    # Activations off: the model equals the float model with fake-quantized weights.
    set_act_mode(model, "off")
    with torch.no_grad():
        for name, layer in weight_quantized_layers(model).items():
            float_model.get_submodule(name).weight.copy_(layer.weight_quant(layer.weight))
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(model(x), float_model(x))
    assert all(int(m.num_updates) == 0 for m in act_quantizers(model).values())


def test_quant_summary_rows():
    model = quantize(ResNetish(), cfg(first_layer_bits=8))
    rows = quant_summary(model)
    assert [r["kind"] for r in rows] == ["conv2d"] * 3 + ["linear"] + ["act"] * 3
    assert rows[0]["bits"] == 8 and rows[0]["scale"] > 0 and rows[0]["range"][0] < rows[0]["range"][1]
    assert rows[-1]["range"] is None and rows[-1]["mode"] == "calibrate"
    calibrate_ranges(model, calib_batches(1))
    row = quant_summary(model)[-1]
    assert row["mode"] == "frozen" and row["updates"] == 1
    assert row["range"][0] == 0.0 and row["scale"] == pytest.approx(row["range"][1] / 15)


def test_errors():
    q = quantize(ResNetish(), cfg())
    with pytest.raises(ValueError, match="already quantized"):
        quantize(q, cfg())

    class Dynamic(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(QuantizationError, match="fx-traceable"):
        quantize(Dynamic(), cfg())


def test_act_quantizers_are_act_fake_quant():
    q = quantize(ResNetish(), cfg(ema_decay=0.5, a_bits=5))
    assert all(isinstance(m, ActFakeQuant) and m.ema_decay == 0.5 and m.bits == 5 for m in act_quantizers(q).values())


class SmoothActs(nn.Module):
    """Every activation kind, as modules, functional calls and a tensor method (one in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.silu = nn.SiLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.hswish = nn.Hardswish()
        self.relu6 = nn.ReLU6()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.silu(self.bn1(self.conv1(x)))  # module SiLU
        x = F.gelu(self.conv2(x))  # functional GELU
        x = self.hswish(x)  # module hardswish
        x = F.hardswish(x, inplace=True)  # functional, in place
        x = self.relu6(x)  # module ReLU6
        x = x.relu()  # tensor method
        x = F.silu(x)
        return self.fc(x.mean((2, 3)))


def test_every_activation_site_gets_a_quantizer_signed_where_outputs_dip_below_zero():
    q = quantize(SmoothActs().eval(), QuantConfig(a_bits=4, act_placement="after_activations"))
    sites = {name.removeprefix("act_quant."): quant.signed for name, quant in act_quantizers(q).items()}
    assert sites == {
        "silu": True,
        "gelu": True,
        "hswish": True,
        "hardswish": True,
        "relu6": False,
        "relu": False,
        "silu_1": True,
    }
    x = torch.randn(8, 3, 6, 6)
    calibrate_ranges(q, [x])
    lo, _ = act_quantizers(q)["act_quant.gelu"].range()
    assert float(lo) < 0  # GELU's negative dip is kept on the signed grid
    # A ReLU output is non-negative: its unsigned grid starts at 0 (zero point 0).
    assert int(act_quantizers(q)["act_quant.relu6"].qparams()[1]) == 0


def test_subclassed_activation_module_is_a_site():
    class MyReLU(nn.ReLU):
        pass

    net = nn.Sequential(nn.Conv2d(3, 4, 3), MyReLU(), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(1, 3, 5, 5))
    quants = act_quantizers(quantize(net.eval(), QuantConfig()))
    assert [q.signed for q in quants.values()] == [False]
