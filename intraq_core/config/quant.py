"""The quantization stage's config (:class:`QuantConfig`) and block reconstruction's (:class:`ReconstructConfig`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from intraq_core.config.stage import StageConfig


class ReconstructConfig(StageConfig):
    """Block-reconstruction PTQ (``quant.method: reconstruct``): AdaRound + LSQ + QDrop, unit by unit.

    Each unit (the stem, every residual block, the head) learns the soft rounding of its
    weights (AdaRound's rectified sigmoid, regularizer ``reg_weight · Σ 1-|2h-1|^β`` with β
    annealed from ``beta_start`` to ``beta_end`` after ``warmup`` of the iterations) and, with
    ``learn_act_scale``, its activation step sizes, minimizing the MSE between its output and
    the full-precision teacher's on the same synthetic images. ``drop_prob`` is QDrop's
    probability of keeping an activation element unquantized during this optimization
    (0 disables QDrop, BRECQ-style). ``num_images`` synthetic training images are used
    (all when None). ``bias_lr`` > 0 also trains the unit's biases (its BatchNorm shifts and
    conv/linear biases) with that learning rate: the mean shift that rounding and clipping leave in
    each channel is absorbed where an integer kernel keeps it anyway (bias correction, learned);
    0 leaves every float parameter untouched. ``unit_layers`` > 1 merges consecutive units until
    each holds at least that many weight layers: a network without residual blocks is otherwise
    reconstructed layer by layer, each layer's error judged where it is made rather than where the
    next layer has amplified (or ignored) it (MobileNet: 2 puts each pointwise conv with the
    depthwise conv that reads it).
    """

    iterations: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=64, ge=1)
    num_images: int | None = Field(default=1024, ge=1)
    lr: float = Field(default=3e-3, gt=0.0)
    act_lr: float = Field(default=4e-5, ge=0.0)
    learn_act_scale: bool = True
    reg_weight: float = Field(default=0.01, ge=0.0)
    beta_start: float = Field(default=20.0, gt=0.0)
    beta_end: float = Field(default=2.0, gt=0.0)
    warmup: float = Field(default=0.2, ge=0.0, lt=1.0)
    drop_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    bias_lr: float = Field(default=0.0, ge=0.0)
    unit_layers: int = Field(default=1, ge=1)


class QuantConfig(StageConfig):
    """Uniform asymmetric fake quantization (weights per output channel, activations per tensor).

    Placement: every Conv1d/Conv2d/Linear weight (subclasses included when their forward is the
    standard one) and, with ``act_placement="weight_inputs"`` (the default; BRECQ/QDrop/Genie),
    the input tensor of every weight layer whatever produced it (any activation function, a
    pooling of one, a residual add, a BN or conv output with no activation), one quantizer per
    tensor, placed where the tensor is produced so that every reader sees the quantized value;
    the first layer's input (the image) only with ``quantize_input``. Pooling, flattening,
    reshaping, dropout and zero padding pass a quantized tensor through (an integer target
    pools on the input's grid). ``act_placement="after_activations"`` is the ZeroQ/IntraQ
    reference placement: a quantizer after every activation-function call and nothing else; on
    ResNets both placements put the same quantizers in the same places. The grid is unsigned
    only where the producer is provably non-negative (ReLU, ReLU6, sigmoid, ...), signed
    otherwise. ``depthwise_act_per_channel`` (default on) gives a tensor that only depthwise
    convolutions read one range per channel: each depthwise output reads a single input
    channel, so the per-channel step and zero point fold into that channel's weight scale and
    bias and the integer kernel stays integer (MobileNets' first depthwise input mixes channels
    whose ranges differ 100-fold: one per-tensor 8-bit grid there costs ~5 points of ImageNet
    top-1 on the shared MobileNetV1). Networks without depthwise convolutions (ResNets) are
    unaffected. Optional extras: separate bits for the first/last layer
    (the 8-bit first/last protocol of Genie/QDrop), for the activations that feed the last
    layer (``last_input_bits``; SQuant's protocol uses 8), for named activation tensors
    (``act_bits``), quantizing the network input and the residual additions.

    ``method`` says how the quantized model is set up before any distillation: ``minmax``
    (the reference: ``calibration_batches`` synthetic batches, the EMA of each activation's
    min/max, nearest rounding), ``reconstruct`` (block-reconstruction PTQ on the synthetic
    images, see :class:`ReconstructConfig`) or ``squant`` (SQuant, ICLR 2022: rounding
    directions flipped to minimize the kernel- and channel-wise summed error, activation ranges
    from the BN statistics, no image at all; ``intraq_core.quant.squant``, ``squant_*`` keys);
    see ``intraq_core.quant.methods.CALIBRATION_METHODS``. ``weight_range``/``act_range`` choose the range
    rule (``minmax``, or ``lp``: the range minimizing the Lp error, ``lp_norm`` = p), and
    ``learn_weight_scale``/``learn_act_scale`` make the step sizes trainable (LSQ) during
    distillation and reconstruction.
    """

    method: Literal["minmax", "reconstruct", "squant"] = "minmax"
    act_placement: Literal["weight_inputs", "after_activations"] = "weight_inputs"
    depthwise_act_per_channel: bool = True
    w_bits: int = Field(default=4, ge=2, le=8)
    a_bits: int = Field(default=4, ge=2, le=8)
    first_layer_bits: int | None = Field(default=None, ge=2, le=8)
    last_layer_bits: int | None = Field(default=None, ge=2, le=8)
    last_input_bits: int | None = Field(default=None, ge=2, le=8)
    # Bits of named activation quantizers (``act_quant.<node>``, the names show-quant and the run's
    # sensitivity ranking print), over a_bits and last_input_bits: e.g. a bottleneck tensor at 8.
    act_bits: dict[str, Annotated[int, Field(ge=2, le=8)]] = Field(default_factory=dict)
    quantize_input: bool = False
    input_bits: int = Field(default=8, ge=2, le=8)
    quantize_residual: bool = False
    weight_symmetric: bool = False
    weight_range: Literal["minmax", "lp"] = "minmax"
    act_range: Literal["minmax", "lp"] = "minmax"
    lp_norm: float = Field(default=2.4, gt=0.0)
    learn_weight_scale: bool = False
    learn_act_scale: bool = False
    ema_decay: float = Field(default=0.9, gt=0.0, lt=1.0)
    calibration_batches: int = Field(default=8, ge=1)
    reconstruct: ReconstructConfig = Field(default_factory=ReconstructConfig)
    # SQuant: the kernel (K) and output-channel (C) flip stages (both off = SQuant-E, nearest),
    # the activation clipping factor (None = the paper's value for the bit width) and the number
    # of BN-statistics samples (input-sized) its activation statistics are measured on.
    squant_kernel: bool = True
    squant_channel: bool = True
    squant_act_sigma: float | None = Field(default=None, gt=0.0)
    squant_act_images: int = Field(default=256, ge=1)

    @property
    def tag(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def trains_act_scale(self) -> bool:
        """Whether activation step sizes are parameters (learned in distillation or reconstruction)."""
        return self.learn_act_scale or (self.method == "reconstruct" and self.reconstruct.learn_act_scale)

    @property
    def stores_weight_range(self) -> bool:
        """Whether weight quantizers keep a stored per-channel range (needed by reconstruction)."""
        return self.weight_range != "minmax" or self.learn_weight_scale or self.method == "reconstruct"

    @property
    def protocol(self) -> str:
        """Which layers are at which bits, in words (for results tables and reports)."""
        first = self.first_layer_bits
        last = self.last_layer_bits
        placement = (
            "activations at weight-layer inputs"
            if self.act_placement == "weight_inputs"
            else ("activations after activation functions")
        )
        if first is None and last is None and self.last_input_bits is None and not self.act_bits:
            return f"all layers W{self.w_bits}A{self.a_bits} ({placement})"
        parts = [f"W{self.w_bits}A{self.a_bits}"]
        if first is not None:
            parts.append(f"first layer {first}-bit weights")
        if last is not None:
            parts.append(f"last layer {last}-bit weights")
        if self.last_input_bits is not None:
            parts.append(f"last layer input {self.last_input_bits}-bit")
        parts += [f"{name} {bits}-bit" for name, bits in sorted(self.act_bits.items())]
        return ", ".join(parts) + f" ({placement})"
