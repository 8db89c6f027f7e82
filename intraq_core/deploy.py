"""Exporting a quantized student for deployment: ONNX with explicit Q/DQ, TorchScript, ``torch.export``.

Plain PyTorch (plus ``onnx``/``onnxruntime`` for the ONNX format); the run-level command that
reads a run's student and writes the file to its location is :func:`pipeline.stages.export.export_run`.

ONNX layout (what ONNX Runtime and TensorRT-style QDQ consumers read):

* every quantized Conv/Linear weight is an fp32 initializer followed by
  ``QuantizeLinear → Clip → DequantizeLinear`` with per-output-channel (``axis=0``) scale and
  zero point taken from ``WeightFakeQuant.qparams`` of the trained weight; the initializer holds
  the weight already snapped to its grid, so the weight the runtime sees is bit-for-bit the
  fake-quantized weight of PyTorch whatever its rounding implementation;
* every activation quantizer (after each activation site, as placed by ``quantize()``, plus the input and
  residual additions when configured) becomes a per-tensor ``QuantizeLinear → Clip →
  DequantizeLinear`` at the calibrated (frozen) scale and zero point of its ``ActFakeQuant``.

Bit widths below 8 use 8-bit containers (``uint8``; ``int8`` for symmetric weights) and express
the k-bit range as a ``Clip`` on the *quantized* tensor between Q and DQ, so
``DQ(Clip(Q(x)))`` equals ``(clamp(round(x/Δ)+zp, qmin, qmax) - zp)·Δ``, exactly the fake-quant
formula. The Clip is left out where the range is the container's full range (8-bit asymmetric).
This works for every k in [2, 8] at opset ≥ 13 (per-axis Q/DQ). ONNX's 4-bit types (opset 21
``UINT4``/``INT4``, which ONNX Runtime 1.32 runs on CPU) would cover k = 4 only, need opset 21
and are consumed by fewer runtimes, so they are not used.

The graph is produced by the TorchScript-based ``torch.onnx.export(dynamo=False)``: each
fake-quant site is traced as one placeholder node (``intraq::FakeQuant``, an
``autograd.Function`` symbolic), then :func:`lower_fake_quant` rewrites the placeholders into
the Q/Clip/DQ nodes with the ``onnx`` API. That keeps the exporter from constant-folding the
weight Q/DQ away or folding BatchNorm into the (quantized) weights, and exports a ResNet-20 in
well under a second (the dynamo exporter took over 30 s for the same graph on 2 cores).

Every Q/DQ site computes exactly what its fake-quant module computes; whole-network logits
from ONNX Runtime still differ now and then, because its convolutions sum in another order and a
value lying within float rounding of a k-bit step boundary lands on the neighbouring level (about
1 image in 1,000 on CIFAR-10 at W4A4; top-1 agreement stays ≥ 99.9%).

The TorchScript export traces the frozen fake-quant student as it is. The ``torch.export``
(``.pt2``) program writes each quantizer with elementary ops at fixed parameters, because
``torch.export`` cannot trace PyTorch's fused fake-quant ops; both reproduce the student exactly.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from intraq_core.config import EvalConfig, ModelConfig, QuantConfig
from intraq_core.quant.layers import act_quantizers, weight_quantized_layers
from intraq_core.quant.quantizer import WeightFakeQuant

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NAMES",
    "EXPORT_DIR",
    "FORMATS",
    "MIN_AGREEMENT",
    "ExportError",
    "QDQSite",
    "compare_logits",
    "example_input",
    "export_bytes",
    "export_copy",
    "export_onnx",
    "export_program",
    "export_torchscript",
    "frozen_copy",
    "load_verification_images",
    "lower_fake_quant",
    "onnx_metadata",
    "onnx_qdq_sites",
    "reference_logits",
    "run_exported",
    "verify_export",
]

FORMATS = ("onnx", "torchscript", "torch-export")
DEFAULT_NAMES = {
    "onnx": "student.onnx",
    "torchscript": "student.torchscript.pt",
    "torch-export": "student.pt2",
}
EXPORT_DIR = "export"
ONNX_OPSET = 17
PLACEHOLDER_DOMAIN = "intraq"
PLACEHOLDER_OP = "FakeQuant"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_AGREEMENT = 99.5


class ExportError(ValueError):
    """The model cannot be exported, or the exported model does not reproduce it."""


@dataclass(frozen=True)
class QDQSite:
    """One fake-quant site of the student and how it is encoded in ONNX."""

    name: str
    kind: str  # "weight" or "activation"
    bits: int
    quant_min: int
    quant_max: int
    axis: int  # 0 for per-output-channel weights, 1 for per-channel activations, -1 for per tensor
    channels: int  # number of scales (1 for per-tensor)


# -- preparing the student ---------------------------------------------------------------------


def frozen_copy(student: nn.Module) -> nn.Module:
    """A deep copy in eval mode whose activation quantizers are frozen (what gets exported).

    Quantizers still in ``calibrate`` mode are frozen at their calibrated range; ``off`` ones
    stay identities. ``dynamic`` quantizers (range from each batch) and uncalibrated ones cannot
    be expressed with fixed Q/DQ parameters: ExportError.
    """
    model = copy.deepcopy(student).eval()
    quants = act_quantizers(model)
    if not quants and not weight_quantized_layers(model):
        raise ExportError("the model has no fake-quant modules; export a student built by quantize()")
    for name, q in quants.items():
        if q.mode == "dynamic":
            raise ExportError(f"activation quantizer {name} is in mode 'dynamic'; freeze its range first")
        if q.mode == "calibrate":
            if not q.calibrated:
                raise ExportError(f"activation quantizer {name} was never calibrated")
            q.mode = "frozen"
    return model.requires_grad_(False)


class _FakeQuantFn(torch.autograd.Function):
    """Fake quantization whose ONNX symbolic is one ``intraq::FakeQuant`` placeholder node.

    ``forward`` is PyTorch's own fused fake-quant op (so the export copy computes exactly what
    the student computes); the scale and zero point also travel as Python lists so the symbolic
    can store them as node attributes for :func:`lower_fake_quant`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        site: QDQSite,
        scales: list[float],
        zero_points: list[int],
    ) -> torch.Tensor:
        if site.axis < 0:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, site.quant_min, site.quant_max)
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, site.axis, site.quant_min, site.quant_max)

    @staticmethod
    def symbolic(
        g: Any,
        x: Any,
        scale: Any,
        zero_point: Any,
        site: QDQSite,
        scales: list[float],
        zero_points: list[int],
    ) -> Any:
        out = g.op(
            f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}",
            x,
            site_s=site.name,
            kind_s=site.kind,
            bits_i=site.bits,
            quant_min_i=site.quant_min,
            quant_max_i=site.quant_max,
            axis_i=site.axis,
            scale_f=scales,
            zero_point_i=zero_points,
        )
        out.setType(x.type())  # Conv needs the (weight) shape downstream
        return out


class _ExportFakeQuant(nn.Module):
    """A fake-quant site with fixed parameters, standing in for a weight or activation quantizer."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, site: QDQSite, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        super().__init__()
        self.site = site
        self.register_buffer("scale", scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(-1).clone())
        self._scales = [float(v) for v in self.scale.tolist()]
        self._zero_points = [int(v) for v in self.zero_point.tolist()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.site.axis >= 0 else self.scale[0]
        zero_point = self.zero_point if self.site.axis >= 0 else self.zero_point[0]
        return _FakeQuantFn.apply(x, scale, zero_point, self.site, self._scales, self._zero_points)


class _ExplicitFakeQuant(nn.Module):
    """A fixed-parameter fake-quant site written with elementary ops, for ``torch.export``.

    ``torch.export`` cannot trace PyTorch's fused fake-quant ops (they have no meta kernel).
    This computes the same float32 arithmetic as their CPU kernels,
    ``(clamp(round(x·(1/Δ)) + zp, qmin, qmax) - zp)·Δ`` with ``1/Δ`` rounded to float32 and
    round-half-to-even, so the exported program matches the student bit for bit.
    """

    scale: torch.Tensor
    inv_scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, site: QDQSite, scale: torch.Tensor, zero_point: torch.Tensor, ndim: int) -> None:
        super().__init__()
        self.site = site
        # Per axis: [C, 1, ...] broadcasts from axis 0 (a weight of ``ndim`` dims); an activation
        # (axis 1) is reshaped to its input's rank in ``forward``.
        shape = (-1, *([1] * (ndim - 1))) if site.axis >= 0 else ()
        scale = scale.detach().float().reshape(shape).clone()
        self.register_buffer("scale", scale)
        self.register_buffer("inv_scale", 1.0 / scale)
        self.register_buffer("zero_point", zero_point.detach().float().reshape(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, inv_scale, zero_point = self.scale, self.inv_scale, self.zero_point
        if self.site.axis > 0:
            shape = (-1, *([1] * (x.dim() - self.site.axis - 1)))
            scale, inv_scale, zero_point = scale.reshape(shape), inv_scale.reshape(shape), zero_point.reshape(shape)
        q = torch.round(x * inv_scale) + zero_point
        q = torch.clamp(q, self.site.quant_min, self.site.quant_max)
        return (q - zero_point) * scale


def export_copy(student: nn.Module, *, explicit: bool = False) -> tuple[nn.Module, list[QDQSite]]:
    """The frozen student with every quantizer replaced by a fixed-parameter site.

    Weights are replaced by their fake-quantized values (qparams computed from the trained
    weights first), so the copy computes exactly what the student computes. Sites trace to ONNX
    placeholders (default) or, with ``explicit``, to elementary ops (for ``torch.export``).
    """
    model = frozen_copy(student)
    sites: list[QDQSite] = []
    layers = weight_quantized_layers(model)

    def make(site: QDQSite, scale: torch.Tensor, zero_point: torch.Tensor, ndim: int) -> nn.Module:
        if explicit:
            return _ExplicitFakeQuant(site, scale, zero_point, ndim)
        return _ExportFakeQuant(site, scale, zero_point)

    with torch.no_grad():
        qparams = {name: layer.weight_quant.qparams(layer.weight) for name, layer in layers.items()}
        for name, layer in layers.items():
            scale, zero_point, qmin, qmax = qparams[name]
            quantizer: WeightFakeQuant = layer.weight_quant
            site = QDQSite(f"{name}.weight", "weight", quantizer.bits, qmin, qmax, 0, int(scale.numel()))
            snapped = torch.fake_quantize_per_channel_affine(layer.weight, scale, zero_point, 0, qmin, qmax)
            layer.weight.copy_(snapped)
            layer.weight_quant = make(site, scale, zero_point, layer.weight.dim())
            sites.append(site)
        for name, quant in act_quantizers(model).items():
            if quant.mode == "off":
                continue
            scale, zero_point = quant.qparams()
            axis = -1 if quant.axis is None else quant.axis
            site = QDQSite(name, "activation", quant.bits, quant.quant_min, quant.quant_max, axis, int(scale.numel()))
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, make(site, scale, zero_point, 0))
            sites.append(site)
    return model, sites


def example_input(model_cfg: ModelConfig, batch: int = 2) -> torch.Tensor:
    """A zero batch of the model's input shape (what the exporters trace with)."""
    size = model_cfg.image_size or 32
    return torch.zeros(batch, 3, size, size)


# -- ONNX --------------------------------------------------------------------------------------


def export_onnx(
    student: nn.Module,
    example: torch.Tensor,
    *,
    opset: int = ONNX_OPSET,
    metadata: dict[str, str] | None = None,
) -> tuple[bytes, list[QDQSite]]:
    """Serialized ONNX model (dynamic batch) with explicit Q/DQ, and the sites it encodes."""
    import onnx

    if opset < 13:
        raise ExportError(f"per-channel QuantizeLinear/DequantizeLinear need opset >= 13, got {opset}")
    model, sites = export_copy(student)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo (used on purpose, see the
        # module docstring); strided Slice ops of option-A shortcuts are not constant-folded.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            custom_opsets={PLACEHOLDER_DOMAIN: 1},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    lowered = lower_fake_quant(proto)
    if lowered != len(sites):
        raise ExportError(f"expected {len(sites)} fake-quant sites in the ONNX graph, found {lowered}")
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "intraq-pipeline"
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString(), sites


def lower_fake_quant(model: Any) -> int:
    """Rewrite every ``intraq::FakeQuant`` placeholder of ``model`` (an ONNX ModelProto) in place.

    Each becomes ``QuantizeLinear → [Clip] → DequantizeLinear`` with initializers
    ``<site>.scale`` (float32), ``<site>.zero_point`` (uint8, or int8 for signed ranges) and, when
    the range is narrower than the container, ``<site>.quant_min/quant_max`` for the Clip.
    Returns the number of sites rewritten; the placeholder opset import is removed.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    taken = {t.name for t in graph.initializer} | {v for n in graph.node for v in n.output}
    nodes = []
    count = 0
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN or node.op_type != PLACEHOLDER_OP:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        name = attrs["site"].decode() if isinstance(attrs["site"], bytes) else str(attrs["site"])
        qmin, qmax, axis = int(attrs["quant_min"]), int(attrs["quant_max"]), int(attrs["axis"])
        dtype = np.int8 if qmin < 0 else np.uint8
        info = np.iinfo(dtype)
        if not (info.min <= qmin < qmax <= info.max):
            raise ExportError(f"{name}: range [{qmin}, {qmax}] does not fit {np.dtype(dtype).name}")
        scale = np.asarray(attrs["scale"], dtype=np.float32)
        zero_point = np.asarray(attrs["zero_point"], dtype=np.int64)
        if zero_point.min() < qmin or zero_point.max() > qmax:
            raise ExportError(f"{name}: zero point outside [{qmin}, {qmax}]")
        zero_point = zero_point.astype(dtype)
        per_axis = {"axis": axis} if axis >= 0 else {}
        if axis < 0:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        s_name, z_name = f"{name}.scale", f"{name}.zero_point"
        clash = taken & {s_name, z_name, f"{name}.quantized", f"{name}.quant_min", f"{name}.quant_max"}
        if clash:
            raise ExportError(f"ONNX names {sorted(clash)} already exist in the graph")
        graph.initializer.extend([numpy_helper.from_array(scale, s_name), numpy_helper.from_array(zero_point, z_name)])
        q_out = f"{name}.quantized"
        nodes.append(
            helper.make_node(
                "QuantizeLinear",
                [node.input[0], s_name, z_name],
                [q_out],
                name=f"{name}/QuantizeLinear",
                **per_axis,
            )
        )
        if (qmin, qmax) != (int(info.min), int(info.max)):
            lo, hi = f"{name}.quant_min", f"{name}.quant_max"
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array(qmin, dtype), lo),
                    numpy_helper.from_array(np.array(qmax, dtype), hi),
                ]
            )
            clipped = f"{name}.quantized_clipped"
            nodes.append(helper.make_node("Clip", [q_out, lo, hi], [clipped], name=f"{name}/Clip"))
            q_out = clipped
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [q_out, s_name, z_name],
                [node.output[0]],
                name=f"{name}/DequantizeLinear",
                **per_axis,
            )
        )
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return count


def onnx_qdq_sites(model: Any) -> list[dict[str, Any]]:
    """Every ``QuantizeLinear → [Clip] → DequantizeLinear`` chain of an ONNX model, described.

    One dict per DequantizeLinear fed by a Q (directly or through one Clip): ``name`` (the Q's
    input), ``kind`` (``weight`` when the Q reads an initializer, else ``activation``), ``axis``,
    ``channels`` (number of scales), ``dtype`` (the zero point's ONNX type name), ``clip``
    (``(min, max)`` or None) and ``consumers`` (op types reading the DQ output, with the input
    slot, e.g. ``Conv:1`` for a convolution weight).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[str]] = {}
    for n in graph.node:
        for slot, inp in enumerate(n.input):
            consumers.setdefault(inp, []).append(f"{n.op_type}:{slot}")
    sites = []
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear":
            continue
        prev = producer.get(dq.input[0])
        clip = None
        if prev is not None and prev.op_type == "Clip":
            clip = tuple(int(numpy_helper.to_array(inits[i])) for i in prev.input[1:3])
            prev = producer.get(prev.input[0])
        if prev is None or prev.op_type != "QuantizeLinear":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        scale = numpy_helper.to_array(inits[dq.input[1]])
        zp = inits[dq.input[2]]
        sites.append(
            {
                "name": prev.input[0],
                "kind": "weight" if prev.input[0] in inits else "activation",
                "axis": int(attrs.get("axis", 1)) if scale.ndim else None,
                "channels": int(scale.size),
                "dtype": TensorProto.DataType.Name(zp.data_type),
                "clip": clip,
                "consumers": consumers.get(dq.output[0], []),
            }
        )
    return sites


# -- TorchScript and torch.export ---------------------------------------------------------------


def export_torchscript(student: nn.Module, example: torch.Tensor) -> bytes:
    """The frozen fake-quant student traced to TorchScript (``torch.jit.load``-able bytes)."""
    model = frozen_copy(student)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, (example,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def export_program(student: nn.Module, example: torch.Tensor) -> bytes:
    """The frozen fake-quant student as a ``torch.export`` program (``.pt2`` bytes), dynamic batch.

    Quantizers are written with elementary ops at fixed parameters (see ``_ExplicitFakeQuant``),
    so the program needs nothing from this project to load, run or compile.
    """
    model, _ = export_copy(student, explicit=True)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def export_bytes(
    student: nn.Module, fmt: str, example: torch.Tensor, *, metadata: dict[str, str] | None = None
) -> tuple[bytes, list[QDQSite]]:
    """Export ``student`` in ``fmt`` (one of :data:`FORMATS`); sites are listed for ONNX only."""
    if fmt == "onnx":
        return export_onnx(student, example, metadata=metadata)
    if fmt == "torchscript":
        return export_torchscript(student, example), []
    if fmt == "torch-export":
        return export_program(student, example), []
    raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


# -- verification ---------------------------------------------------------------------------


def run_exported(fmt: str, data: bytes, images: torch.Tensor, *, batch_size: int = 500) -> np.ndarray:
    """Logits of an exported model (ONNX Runtime on CPU, or the loaded TorchScript/.pt2) on images."""
    outs: list[np.ndarray] = []
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].numpy()
            outs.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
        return np.concatenate(outs)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still supported
            module: Any = torch.jit.load(io.BytesIO(data), map_location="cpu")
    elif fmt == "torch-export":
        module = torch.export.load(io.BytesIO(data)).module()
    else:
        raise ExportError(f"unknown export format {fmt!r}")
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            outs.append(module(images[start : start + batch_size]).numpy())
    return np.concatenate(outs)


@torch.no_grad()
def reference_logits(student: nn.Module, images: torch.Tensor, *, batch_size: int = 500) -> np.ndarray:
    """Logits of the eager fake-quant student (frozen ranges, eval mode, CPU)."""
    model = frozen_copy(student).cpu()
    return np.concatenate([model(images[s : s + batch_size]).numpy() for s in range(0, images.shape[0], batch_size)])


def compare_logits(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 agreement (%) and logit differences of an export against the eager student.

    With ``labels``, also both top-1 accuracies (%). ``images_within_1e-4`` counts images whose
    logits all agree to 1e-4: a quantized network flips an activation level now and then when
    two runtimes sum a convolution in a different order, and such an image differs by a level
    downstream while every other image matches.
    """
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    per_image = diff.max(axis=1)
    out: dict[str, Any] = {
        "images": int(reference.shape[0]),
        "agreement": float(100.0 * np.mean(reference.argmax(1) == candidate.argmax(1))),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "images_within_1e-4": int((per_image <= 1e-4).sum()),
    }
    if labels is not None:
        out["reference_top1"] = float(100.0 * np.mean(reference.argmax(1) == labels))
        out["export_top1"] = float(100.0 * np.mean(candidate.argmax(1) == labels))
    return out


def verify_export(
    fmt: str,
    data: bytes,
    student: nn.Module,
    images: torch.Tensor,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Run the export and the eager student on the same images and compare (see compare_logits)."""
    return compare_logits(reference_logits(student, images), run_exported(fmt, data, images), labels)


def load_verification_images(eval_cfg: EvalConfig, model_cfg: ModelConfig, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``n`` images (normalized) and labels of a real test set."""
    from intraq_core.data import load_test_set

    test_set = load_test_set(eval_cfg.model_copy(update={"limit": n}), model_cfg)
    xs, ys = [], []
    for x, y in test_set.batches(eval_cfg.batch_size):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs)[:n], torch.cat(ys)[:n].numpy()


def onnx_metadata(model_cfg: ModelConfig, quant_cfg: QuantConfig, stage: str) -> dict[str, str]:
    """Metadata stored in the ONNX file: how to feed it and what was quantized."""
    return {
        "intraq.arch": model_cfg.arch,
        "intraq.stage": stage,
        "intraq.quant": json.dumps(quant_cfg.model_dump(mode="json"), sort_keys=True),
        "intraq.input": "float32 NCHW, normalized: (pixel/255 - mean) / std",
        "intraq.mean": json.dumps(list(model_cfg.mean or ())),
        "intraq.std": json.dumps(list(model_cfg.std or ())),
    }
