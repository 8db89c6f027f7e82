"""The Python API: from a loaded ``nn.Module`` to an evaluated, exported quantized student.

Each step is one function over plain tensors and the stage configs of :mod:`intraq_core.config`,
running in this process (no Ray):

    synthesize → quantize → calibrate (the method of ``QuantConfig.method``) → distill_student
    → accuracy → export

These are the same building blocks the ``intraq-pipeline`` CLI runs (the same synthesis plan,
quantizer placement, calibration and training step), so a recipe tried in a notebook carries
over to a cluster run. Example (a toy budget: seconds on a CPU, the accuracy means nothing)::

    >>> import intraq_core as iq
    >>> cfg = iq.ModelConfig(arch="cifar_resnet20", weights="cifar10-resnet20")
    >>> teacher, spec = iq.create_model(cfg), iq.input_spec(cfg)
    >>> data = iq.synthesize(teacher, spec, iq.SynthConfig(num_images=20, batch_size=10, iterations=2))
    >>> student = iq.quantize(teacher, iq.QuantConfig(w_bits=4, a_bits=4))
    >>> student = iq.calibrate(student, data, iq.QuantConfig(w_bits=4, a_bits=4, calibration_batches=1))
    >>> rows = iq.distill_student(student, teacher, data, iq.DistillConfig(epochs=1, batch_size=10))
    >>> iq.accuracy(student, spec, "cifar10-test", limit=100)
    {'top1': ..., 'n': 100}
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from intraq_core.config import DistillConfig, EvalConfig, ModelConfig, QuantConfig, SynthConfig
from intraq_core.models.imported import declared_spec, head_classes
from intraq_core.models.registry import resolve_model_config
from intraq_core.quant.methods import CalibrationInputs, calibration_positions, run_calibration

__all__ = [
    "InputSpec",
    "SyntheticData",
    "accuracy",
    "calibrate",
    "distill_student",
    "export",
    "input_spec",
    "synthesize",
]


@dataclass(frozen=True)
class InputSpec:
    """What a classifier expects of its input, and how many classes it predicts.

    Images are RGB in [0, 1], resized to ``image_size`` × ``image_size``, then normalized as
    ``(x - mean) / std``: the normalization the weights were trained with (a wrong one costs
    accuracy silently). Make one with :func:`input_spec`.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, image_size, image_size)``."""
        return (3, self.image_size, self.image_size)

    def model_config(self, arch: str = "cifar_resnet20") -> ModelConfig:
        """This spec as the ``model`` section of a run config (``arch`` names the architecture)."""
        return ModelConfig(
            arch=arch, image_size=self.image_size, mean=self.mean, std=self.std, num_classes=self.num_classes
        )


def _declared_spec(model: nn.Module) -> dict[str, Any]:
    out = declared_spec(model)
    head = head_classes(model)
    if "num_classes" not in out and head is not None:
        out["num_classes"] = head[1]
    return out


def input_spec(
    source: nn.Module | ModelConfig | str | None = None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
) -> InputSpec:
    """The :class:`InputSpec` of a model: from its config, from the module itself, or as given.

    ``source`` is a ``ModelConfig`` or an architecture name (resolved as the CLI does: weights
    metadata, checkpoint, architecture defaults), or an ``nn.Module`` (its timm-style
    ``pretrained_cfg``/``default_cfg`` and the size of its last ``nn.Linear``), or None. The
    keyword arguments override what ``source`` says; a field nobody gives is an error.

    Args:
        source: the model's config, architecture name or module (or None).
        image_size: input height and width in pixels.
        mean: per-channel mean of the normalization (RGB in [0, 1]).
        std: per-channel std of the normalization.
        num_classes: number of classes the model predicts.

    Example:
        >>> input_spec("cifar_resnet20", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        InputSpec(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_classes=10)
    """
    known: dict[str, Any] = {}
    if isinstance(source, str):
        source = ModelConfig(arch=source)
    if isinstance(source, ModelConfig):
        explicit = {"image_size": image_size, "mean": mean, "std": std, "num_classes": num_classes}
        update = {k: tuple(v) if k in ("mean", "std") else v for k, v in explicit.items() if v is not None}
        resolved = resolve_model_config(ModelConfig.model_validate({**source.model_dump(), **update}))
        known = {k: getattr(resolved, k) for k in ("image_size", "mean", "std", "num_classes")}
    elif isinstance(source, nn.Module):
        known = _declared_spec(source)
    elif source is not None:
        raise TypeError(f"input_spec() takes a ModelConfig, an architecture name or an nn.Module, not {source!r}")
    given = {"image_size": image_size, "mean": mean, "std": std, "num_classes": num_classes}
    values = {k: v if v is not None else known.get(k) for k, v in given.items()}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"input_spec: give {', '.join(missing)} (nothing in the model says)")
    spec = ModelConfig(  # validates ranges and the three-channel normalization
        image_size=values["image_size"], mean=values["mean"], std=values["std"], num_classes=values["num_classes"]
    )
    assert spec.image_size and spec.mean and spec.std and spec.num_classes
    return InputSpec(spec.image_size, spec.mean, spec.std, spec.num_classes)


@dataclass
class SyntheticData:
    """Synthetic images in the teacher's normalized input space, with the labels they were made for.

    ``images`` is ``[N, 3, H, W]`` float32 (already normalized: feed it to the model as is) and
    ``labels`` ``[N]`` int64. ``spec`` is the input spec they were made for.
    """

    images: Tensor
    labels: Tensor
    spec: InputSpec

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``(images, labels)`` batches in order."""
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size], self.labels[start : start + batch_size]


def synthesize(
    teacher: nn.Module,
    spec: InputSpec,
    config: SynthConfig | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> SyntheticData:
    """Synthesize ``config.num_images`` images from the frozen ``teacher`` (IntraQ by default).

    Runs the pipeline's plan in memory: batches of ``config.batch_size`` images optimized for
    ``config.iterations`` steps, in rounds of ``config.shards_per_round`` batches whose MDC term
    sees the class centres of earlier rounds (``config.groups_per_pass`` batches of a round per
    forward/backward pass, each with its own loss); the same config and seed give the same images
    as ``intraq-pipeline generate``. A teacher without BatchNorm is refused when the method uses the
    BN-statistics loss (``config.method`` ``gaussian``, or ``bns_weight=0``, need none).

    Args:
        teacher: the full-precision classifier (copied and frozen; left untouched).
        spec: its input spec (:func:`input_spec`).
        config: the synthesis settings (method, number of images, batch size, iterations, loss weights).
        seed: seeds the labels, the initial noise and every batch.
        device: where to optimize (``"cuda"`` on a GPU).
        progress: show a progress bar.

    Example:
        >>> import intraq_core as iq
        >>> teacher = iq.create_model("cifar_resnet20")
        >>> data = iq.synthesize(teacher, iq.input_spec("cifar_resnet20"), iq.SynthConfig(num_images=10, iterations=1))
        >>> data.images.shape, data.labels.tolist()
        (torch.Size([10, 3, 32, 32]), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    from tqdm.auto import tqdm

    from intraq_core.synth.centres import ClassCentres
    from intraq_core.synth.engine import Synthesizer
    from intraq_core.synth.plan import packs, plan_tasks, rounds

    cfg = (config or SynthConfig()).for_classes(spec.num_classes)  # min_images_per_class, as the pipeline
    tasks = plan_tasks(
        cfg.num_images,
        spec.num_classes,
        batch_size=cfg.batch_size,
        batches_per_round=cfg.shards_per_round,
        label_mode=cfg.label_plan,
        seed=seed,
    )
    synth = Synthesizer(
        teacher,
        cfg,
        image_shape=spec.image_shape,
        num_classes=spec.num_classes,
        device=device,
        normalization=(spec.mean, spec.std),
    )
    iterations = cfg.iterations if cfg.optimizes else 1
    bar = tqdm(total=len(tasks) * iterations, desc="synthesize", unit="it", disable=not progress, leave=False)
    images: list[Tensor] = []
    labels: list[Tensor] = []
    centres: ClassCentres | None = None
    try:
        for round_tasks in rounds(tasks):
            snapshot = centres.snapshot() if centres is not None and centres.counts.any() else None
            finished = []
            for pack in packs(round_tasks, cfg.groups_per_pass):
                groups = [
                    (
                        torch.tensor(task.labels, dtype=torch.int64),
                        torch.tensor(task.image_seeds, dtype=torch.int64),
                        task.batch_seed,
                    )
                    for task in pack
                ]
                step = len(pack)
                results = synth.synthesize_groups(
                    groups, snapshot, progress=(lambda *_, k=step: bar.update(k)) if cfg.optimizes else None
                )
                if not cfg.optimizes:
                    bar.update(step)
                finished.extend(results)
            for result in finished:  # centres grow in task order once the round is done
                if centres is None:
                    centres = ClassCentres(spec.num_classes, result.features.shape[1])
                centres.update(result.features.numpy(), result.labels.numpy())
                images.append(result.images)
                labels.append(result.labels)
    finally:
        bar.close()
        synth.close()
    return SyntheticData(torch.cat(images), torch.cat(labels), spec)


def calibrate(
    student: nn.Module,
    data: SyntheticData | Tensor | Sequence[Tensor],
    config: QuantConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    batch_size: int = 128,
    seed: int = 0,
    images: Tensor | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> nn.Module:
    """Set the quantization parameters of a ``quantize``-d student, by ``config.method``; returns it.

    ``data`` is synthetic data (or an image tensor), from which ``config.calibration_batches``
    seeded batches of ``batch_size`` images are drawn, or a list of batches used as given. With
    ``minmax`` (the default) each activation range is the EMA of the batches' min/max (or the
    Lp-optimal range, ``act_range: lp``), then frozen; ``reconstruct`` then runs block
    reconstruction on ``images`` (default: all of ``data``, or the batches).

    Args:
        student: a model returned by ``quantize`` (modified in place).
        data: synthetic data, an image tensor ``[N, 3, H, W]``, or a list of batches.
        config: the quantization config (``method``, ``calibration_batches``).
        teacher: the full-precision model, for methods that fit the student to it.
        batch_size: images per calibration batch drawn from ``data``.
        seed: seeds which images form the batches (and reconstruction's sampling).
        images: the synthetic training images for block reconstruction.
        progress: ``progress(done, total, unit)`` after each reconstructed unit.

    Example:
        >>> import torch, intraq_core as iq
        >>> student = iq.quantize(iq.create_model("cifar_resnet20"), iq.QuantConfig())
        >>> _ = iq.calibrate(student, torch.randn(16, 3, 32, 32), iq.QuantConfig(calibration_batches=2))
        >>> sorted({q.mode for q in iq.act_quantizers(student).values()})
        ['frozen']
    """
    cfg = config or QuantConfig()
    if isinstance(data, SyntheticData):
        data = data.images
    if isinstance(data, Tensor):
        if images is None:
            images = data
        batches = [data[idx] for idx in calibration_positions(data.shape[0], cfg.calibration_batches, batch_size, seed)]
    else:
        batches = list(data)
    run_calibration(student, cfg, CalibrationInputs(batches, teacher, images, seed, progress))
    return student


def distill_student(
    student: nn.Module,
    teacher: nn.Module,
    data: SyntheticData,
    config: DistillConfig | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    holdout: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """Fine-tune the calibrated ``student`` by distillation from the frozen ``teacher`` on ``data``.

    The pipeline's training loop (KD + CE loss, augmentation, SGD-Nesterov, schedule), in this
    process. Returns one row per epoch (loss, kd, ce, agreement with the teacher, lr). With
    ``holdout`` images (synthetic images it does not train on), the pipeline's data-free guard
    watches the student every ``config.eval_every`` epochs and, with ``config.select="best"``,
    leaves ``student`` at its best-scoring state, which may be the calibrated start
    (:class:`intraq_core.selection.Selector`).

    Args:
        student: the calibrated student (trained in place).
        teacher: the full-precision model it learns from (frozen).
        data: the synthetic images and their labels.
        config: epochs, batch size, learning rate, KD weight and temperature, augmentation.
        seed: seeds the batch order and the augmentation.
        device: where to train.
        progress: show a progress bar.
        holdout: images for the data-free guard (None: no guard, the final student is kept).

    Example:
        >>> import torch, intraq_core as iq
        >>> teacher = iq.create_model("cifar_resnet20")
        >>> student = iq.calibrate(iq.quantize(teacher, iq.QuantConfig()), torch.randn(8, 3, 32, 32))
        >>> data = iq.SyntheticData(torch.randn(8, 3, 32, 32), torch.arange(8) % 10, iq.input_spec("cifar_resnet20"))
        >>> rows = iq.distill_student(student, teacher, data, iq.DistillConfig(epochs=1, batch_size=4))
        >>> sorted(rows[0])[:3]
        ['agreement', 'ce', 'epoch']
    """
    from intraq_core.distill import distill, distillation_selector

    teacher = teacher.eval().requires_grad_(False)
    config = config or DistillConfig()
    selector = None
    if holdout is not None and holdout.shape[0] > 0:
        selector = distillation_selector(teacher, holdout, config, device=device, seed=seed)
    return distill(
        student.requires_grad_(True),
        teacher,
        data.images,
        data.labels,
        config,
        seed=seed,
        device=device,
        progress=progress,
        selector=selector,
    ).epochs


def accuracy(
    model: nn.Module,
    spec: InputSpec,
    data: str = "cifar10-test",
    *,
    classes: str | None = None,
    labels: str | None = None,
    limit: int | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy (%) and image count of ``model`` on a real labelled test set.

    ``data`` is what ``eval.data`` takes: a named asset (``cifar10-test``), an ``.npz`` file, an
    ImageFolder directory, a flat folder of images with ``labels``, or ``torchvision:cifar10``;
    images are preprocessed (ImageNet's resize 256 -> centre crop 224 above 64 pixels) and
    normalized with ``spec``.

    Args:
        model: any classifier (float teacher or quantized student).
        spec: its input spec (normalization, size, classes).
        data: the labelled test set.
        classes: the model's class list in output order (``imagenet1k`` or a file), to label the
            folders of an ImageFolder holding a subset of the classes.
        labels: the ground-truth file (``<file name> <class>`` lines) of a flat folder of images.
        limit: use only the first ``limit`` images.
        batch_size: images per forward pass.
        device: where to run.
        progress: show a progress bar.
    """
    from intraq_core.data import load_test_set
    from intraq_core.evaluate import top1

    eval_cfg = EvalConfig(data=data, classes=classes, labels=labels, limit=limit, batch_size=batch_size)
    test_set = load_test_set(eval_cfg, spec.model_config())
    model = model.to(device)
    return top1(model, test_set.batches(batch_size), device=device, progress=progress, total=test_set.num_samples)


def export(
    student: nn.Module,
    spec: InputSpec,
    path: str | os.PathLike[str],
    *,
    format: str = "onnx",
    quant_config: QuantConfig | None = None,
) -> Path:
    """Write the frozen student as ``format`` (``onnx`` with Q/DQ, ``torchscript``, ``torch-export``).

    The file takes a float32 NCHW batch normalized with ``spec`` and returns logits. The ONNX file
    records the normalization (and ``quant_config``, when given) in its metadata. For a student of
    a pipeline run, ``intraq-pipeline export RUN`` also checks the file against PyTorch.

    Args:
        student: the calibrated (and distilled) student; its activation ranges are frozen in the file.
        spec: its input spec (the traced input shape and the recorded normalization).
        path: the file to write (atomically); returned.
        format: ``onnx``, ``torchscript`` or ``torch-export``.
        quant_config: recorded in the ONNX metadata when given.
    """
    from intraq_core.deploy import FORMATS, export_bytes
    from intraq_core.deploy_onnx import onnx_metadata
    from intraq_core.errors import ExportError

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    metadata = onnx_metadata(spec.model_config(arch="(in memory)"), quant_config or QuantConfig(), "api")
    if quant_config is None:
        metadata.pop("intraq.quant")
    example = torch.zeros(2, *spec.image_shape)
    blob, _ = export_bytes(student.cpu(), format, example, metadata=metadata)
    dest = Path(path).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest
