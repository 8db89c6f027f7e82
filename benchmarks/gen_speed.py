"""Generation speed: the project's Synthesizer vs a reference-faithful loop, side by side.

Both optimize the same batch (same teacher, labels, initial noise, loss terms and
iterations, same torch thread count) in one process, alternating repetitions so machine
load affects both alike. The reference-faithful loop reproduces the upstream IntraQ
generation loop's costs: the teacher's weights require gradients (autograd also computes
weight gradients), LOR is a per-image Python loop, BN statistics take two passes (mean,
then a permuted contiguous copy for the variance), contiguous (NCHW) memory format.

    python benchmarks/gen_speed.py --batch 256 --iterations 20 --repeats 3 --threads 2

Writes a JSON + Markdown row to benchmarks/results/ (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn

from intraq_core.config import ModelConfig, SynthConfig
from intraq_core.models import bn_layers, create_model
from intraq_core.models.introspect import FeatureTap
from intraq_core.synth import losses
from intraq_core.synth.centres import ClassCentres
from intraq_core.synth.engine import Synthesizer, initial_noise
from intraq_core.synth.lor import reference_lor, sample_lor_params


def reference_loop(
    teacher: nn.Module,
    cfg: SynthConfig,
    labels: torch.Tensor,
    seeds: torch.Tensor,
    batch_seed: int,
    centres: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
) -> float:
    """The upstream loop's structure and costs; returns seconds spent."""
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(True)  # as upstream: the frozen teacher still gets weight gradients
    means: list[torch.Tensor] = []
    variances: list[torch.Tensor] = []
    layers = [m for _, m in bn_layers(teacher)]

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        c = x.shape[1]
        means.append(x.mean([0, 2, 3]))
        variances.append(x.permute(1, 0, 2, 3).contiguous().view(c, -1).var(1, unbiased=False))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    tap = FeatureTap(teacher)
    n = labels.shape[0]
    gen = torch.Generator().manual_seed(batch_seed)
    targets = losses.sil_targets(n, cfg.sil_epsilon, cfg.sil_fraction, gen).to(device)
    x = initial_noise(seeds, (3, 32, 32)).to(device).requires_grad_(True)
    y = labels.to(device)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=cfg.plateau_patience, min_lr=1e-4)
    w = cfg.weights()
    start = time.perf_counter()
    for _ in range(cfg.iterations):
        inp = x
        if float(torch.rand(1, generator=gen)) < cfg.lor_prob:
            params = sample_lor_params(n, 32, 32, min_area=cfg.lor_min_area, generator=gen, flip=cfg.lor_flip)
            inp = reference_lor(x, params)
        means.clear()
        variances.clear()
        logits = teacher(inp)
        bm, bv = losses.bns_loss(means, variances, [m.running_mean for m in layers], [m.running_var for m in layers])
        total = w["bns"] * (bm + bv) + w["sil"] * losses.sil_loss(logits, y, targets)
        if centres is not None and w["mdc"] > 0:
            lo, up = losses.mdc_loss(tap.features, y, centres[0], centres[1], cfg.mdc_lower, cfg.mdc_upper)
            total = total + w["mdc"] * (lo + up)
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step(total.item())
    seconds = time.perf_counter() - start
    for h in handles:
        h.remove()
    tap.remove()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/gen_speed")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher = create_model(ModelConfig(arch="cifar_resnet20", weights="cifar10-resnet20"))
    cfg = SynthConfig(
        method="intraq", iterations=args.iterations, batch_size=args.batch, amp=args.amp, compile=args.compile
    )
    labels = torch.arange(args.batch) % 10
    seeds = torch.arange(args.batch) + 12345
    # Realistic MDC centres (from a first batch's clean features) so every term is active.
    synth = Synthesizer(teacher, cfg, image_shape=(3, 32, 32), num_classes=10, device=device)
    store = ClassCentres(10, 64)
    store.update(synth.features(initial_noise(seeds + 999, (3, 32, 32))), labels)
    centres = store.snapshot(device)

    ours, ref = [], []
    synth.synthesize(labels, seeds, 7, centres)  # warm-up (and compile, if enabled)
    reference_loop(
        create_model(ModelConfig(arch="cifar_resnet20", weights="cifar10-resnet20")),
        cfg,
        labels,
        seeds,
        7,
        centres,
        device,
    )
    for r in range(args.repeats):
        res = synth.synthesize(labels, seeds, 100 + r, centres)
        ours.append(res.seconds)
        ref_teacher = create_model(ModelConfig(arch="cifar_resnet20", weights="cifar10-resnet20"))
        ref.append(reference_loop(ref_teacher, cfg, labels, seeds, 100 + r, centres, device))
        rate_ours = args.batch * args.iterations / ours[-1]
        rate_ref = args.batch * args.iterations / ref[-1]
        print(f"repeat {r}: ours {rate_ours:.1f} img-it/s, reference {rate_ref:.1f} img-it/s", flush=True)
    work = args.batch * args.iterations
    ours_rate = [work / s for s in ours]
    ref_rate = [work / s for s in ref]
    ratio = statistics.median(ours_rate) / statistics.median(ref_rate)
    dev_name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {
        "date": date.today().isoformat(),
        "device": args.device,
        "device_name": dev_name,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "batch": args.batch,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "amp": args.amp,
        "compile": args.compile,
        "ours_img_it_per_s": ours_rate,
        "reference_img_it_per_s": ref_rate,
        "speedup_median": ratio,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = f"{args.device}-{args.amp}{'-compile' if args.compile else ''}"
    Path(f"{out}-{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
