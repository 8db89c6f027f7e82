"""Where a quantized student departs from its teacher: relative output error of every weight layer.

For each quantized Conv/Linear layer, ``‖y_q − y‖² / ‖y‖²`` of its output against the teacher's
same layer, on synthetic images of a run's dataset (data-free: no test image is read). Either a
fresh quantization of the teacher (Lp ranges calibrated on the first images) with 4-bit weights
only, activations only, and both; or a written student (``--student``), e.g. the reconstructed start
``student_calibrated.pt``. With a fresh quantization a second table ranks the activation tensors by
what each costs alone (every other quantizer off): the KL divergence from the teacher's predictions
and the top-1 agreement on the same synthetic images, so a tensor that 4 bits cannot carry (the
ImageNet MobileNetV1's 8-channel stem output) shows up without real data. Example (the tables of
``results/imagenet-mobilenetv1-cpu.md``)::

    python -m benchmarks.layer_error --dataset runs/data-s0 --weights imagenet-mobilenetv1-025 --bits 4
    python -m benchmarks.layer_error --dataset runs/data-s0 --weights imagenet-mobilenetv1-025 \
        --student runs/w4a4-s0/student_calibrated.pt
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.crossprobe import dataset_images
from intraq_core.config import ModelConfig, QuantConfig
from intraq_core.models import create_model, resolve_model_config
from intraq_core.quant import calibrate_ranges, quantize, set_act_mode, weight_quantized_layers
from intraq_core.quant.sensitivity import activation_sensitivity
from intraq_core.student import load_student


def layer_errors(teacher: nn.Module, student: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Relative squared error of each weight layer's output (student against teacher) on ``images``."""
    names = list(weight_quantized_layers(student))
    seen: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda _m, _i, o, k=(i, n): seen.__setitem__(k, o))
        for i, model in enumerate((teacher, student))
        for n in names
    ]
    with torch.no_grad():
        teacher(images), student(images)
    for h in hooks:
        h.remove()
    return {n: float((seen[(0, n)] - seen[(1, n)]).pow(2).mean() / seen[(0, n)].pow(2).mean()) for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="a synthetic dataset, or a run location holding one (data/)")
    parser.add_argument("--weights", required=True, help="the teacher (a named asset or a weights file)")
    parser.add_argument("--student", default=None, help="a written student checkpoint instead of --weights/--bits")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--images", type=int, default=128, help="images scored (after the 256 calibrated on)")
    args = parser.parse_args()
    torch.manual_seed(0)
    images = dataset_images(args.dataset)
    calib, scored = images[:256], images[256 : 256 + args.images]
    teacher = create_model(resolve_model_config(ModelConfig(weights=args.weights))).eval()
    if args.student:
        rows = {"student": layer_errors(teacher, load_student(args.student)[0], scored)}
    else:
        b = args.bits
        student = quantize(teacher, QuantConfig(w_bits=b, a_bits=b, weight_range="lp", act_range="lp"))
        calibrate_ranges(student, [calib[i : i + 64] for i in range(0, len(calib), 64)])
        rows = {}
        for label, weights_on, acts_on in (
            (f"W{b} only", True, False),
            (f"A{b} only", False, True),
            ("both", True, True),
        ):
            for layer in weight_quantized_layers(student).values():
                layer.weight_quant.enabled = weights_on
            set_act_mode(student, "frozen" if acts_on else "off")
            rows[label] = layer_errors(teacher, student, scored)
    labels = list(rows)
    print("| layer | " + " | ".join(labels) + " |")
    print("| --- |" + " ---: |" * len(labels))
    for name in next(iter(rows.values())):
        print(f"| {name} | " + " | ".join(f"{rows[k][name]:.3f}" for k in labels) + " |")
    if not args.student:
        print(f"\n| activation tensor, A{b} alone | KL from the teacher | top-1 agreement % |")
        print("| --- | ---: | ---: |")
        for row in activation_sensitivity(teacher, student, scored):  # the ranking every run records
            print(f"| {row['name']} | {row['kl']:.4f} | {row['agreement']:.1f} |")


if __name__ == "__main__":
    main()
