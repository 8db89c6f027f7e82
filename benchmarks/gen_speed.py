"""Generation speed: the project's Synthesizer vs a reference-faithful loop, side by side, at 32² and 224².

Cases (``--cases``): ``resnet20-32`` (the shared CIFAR-10 ResNet-20, 32x32, 10 classes),
``mobilenetv1-224`` (the shared ImageNet MobileNetV1 x0.25, 224x224, 1000 classes, batch 64) and
``resnet18-224`` (torchvision ``resnet18`` with random weights, 224x224). In each case both loops
optimize the same batch (same teacher, labels, initial noise, IntraQ loss terms with MDC centres
active, LOR p = 0.5, Adam + plateau schedule, iterations and torch threads), alternating
repetitions so machine load affects both alike; ours in this process, the reference in a spawned
process of its own, as upstream's would be. The reference-faithful loop
reproduces the upstream IntraQ generation loop's costs: the teacher's weights require gradients
(autograd also computes weight gradients), LOR is a per-image Python loop, BN statistics take two
passes (mean, then a permuted contiguous copy for the variance), contiguous (NCHW) memory format.
Ours is timed from the ``synthesize`` call to the end of its last iteration (initial noise and
set-up included, the final feature pass of the finished images not), the reference over its
iterations only. Ours runs with the pipeline's C allocator setting (``--allocator``, default
``reuse``: :func:`intraq_core.memory.reuse_freed_memory`), the reference with the C library's
defaults (its own process never sets it).

Reported per case: image·iterations/s of each loop (per repeat, median, spread), the speed-up
(ratio of medians), and the arithmetic rate achieved: FLOPs of one image's forward + pixel-gradient
backward (``torch.utils.flop_counter.FlopCounterMode`` on the frozen teacher with the input
requiring gradients: convolutions, their input-gradient convolutions and matmuls; elementwise work,
BN statistics and LOR are not counted) times image·iterations/s. The fraction of peak divides it by
the machine's fp32 peak measured in the same process and threads: the best of ``--repeats`` timed
2048x2048 fp32 matmuls (one before each repetition). The nominal peak from the CPU's flags and clock
(AVX2+FMA: 2 x 8-lane FMA per cycle per core = 32 FLOP/cycle; AVX-512: 64) is recorded beside it.
The 1-minute load average before and after each case is recorded (the box may be shared).

    python -m benchmarks.gen_speed --threads 2 --repeats 3

Writes ``<out>-<device>-<amp>[-compile].json`` (``--out``, default ``benchmarks/results/gen_speed``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from intraq_core.config import ModelConfig, SynthConfig
from intraq_core.memory import reuse_freed_memory
from intraq_core.models import bn_layers, create_model
from intraq_core.models.introspect import FeatureTap
from intraq_core.synth import losses
from intraq_core.synth.centres import ClassCentres
from intraq_core.synth.engine import NATIVE_BF16_FLAGS, Synthesizer, cpu_flags, initial_noise
from intraq_core.synth.lor import reference_lor, sample_lor_params


@dataclass(frozen=True)
class Case:
    """One teacher and input size, with its default batch and iterations."""

    model: Callable[[], nn.Module]
    size: int
    classes: int
    batch: int
    iterations: int


CASES: dict[str, Case] = {
    "resnet20-32": Case(
        lambda: create_model(ModelConfig(arch="cifar_resnet20", weights="cifar10-resnet20")), 32, 10, 256, 20
    ),
    "mobilenetv1-224": Case(
        lambda: create_model(ModelConfig(arch="mobilenet_v1_025", weights="imagenet-mobilenetv1-025")), 224, 1000, 64, 3
    ),
    "resnet18-224": Case(
        lambda: _seeded(lambda: create_model(ModelConfig(arch="torchvision:resnet18"))), 224, 1000, 8, 3
    ),
}


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def reference_loop(
    teacher: nn.Module,
    cfg: SynthConfig,
    labels: torch.Tensor,
    seeds: torch.Tensor,
    batch_seed: int,
    centres: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
    size: int,
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
    x = initial_noise(seeds, (3, size, size)).to(device).requires_grad_(True)
    y = labels.to(device)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=cfg.plateau_patience, min_lr=1e-4)
    w = cfg.weights()
    start = time.perf_counter()
    for _ in range(cfg.iterations):
        inp = x
        if float(torch.rand(1, generator=gen)) < cfg.lor_prob:
            params = sample_lor_params(n, size, size, min_area=cfg.lor_min_area, generator=gen, flip=cfg.lor_flip)
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


def _reference_server(conn: Connection, name: str, threads: int, device: str) -> None:
    """The reference loop's own process: times :func:`reference_loop` for each request on ``conn``.

    A process of its own, as upstream's would be: the C library's defaults (never the pipeline's
    allocator setting, whose freed blocks would otherwise serve the reference's tensors too).
    """
    torch.set_num_threads(threads)
    case = CASES[name]
    while True:
        request = conn.recv()
        if request is None:
            return
        cfg, labels, seeds, batch_seed, centres = request
        dev = torch.device(device)
        conn.send(reference_loop(case.model(), cfg, labels, seeds, batch_seed, centres, dev, case.size))


class ReferenceProcess:
    """A spawned process running :func:`reference_loop` on request (see :func:`_reference_server`)."""

    def __init__(self, name: str, threads: int, device: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_reference_server, args=(child, name, threads, device), daemon=True)
        self.proc.start()

    def seconds(self, *request: Any) -> float:
        self.conn.send(request)
        return float(self.conn.recv())

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=60)


def flops_per_image_iteration(teacher: nn.Module, size: int) -> float:
    """FLOPs of one image's forward + pixel-gradient backward through the frozen teacher."""
    net = teacher.eval().requires_grad_(False)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        net(x).float().sum().backward()
    return counter.get_total_flops() / 2


def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    """Best fp32 GFLOP/s of an n x n matmul on this process's torch threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def cpu_info(threads: int) -> dict[str, Any]:
    """CPU model, SIMD flags that matter here, clock and the nominal fp32 peak of ``threads`` cores."""
    model, mhz, flags = platform.processor() or platform.machine(), 0.0, cpu_flags()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key == "cpu MHz" and not mhz:
                mhz = float(value)
    except OSError:
        pass
    simd = sorted(f for f in flags if f in {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    per_cycle = 64 if "avx512f" in flags else (32 if {"avx2", "fma"} <= flags else 0)
    return {
        "cpu_model": model,
        "simd_flags": simd,
        "native_bf16": bool(NATIVE_BF16_FLAGS & flags),
        "mhz": mhz,
        "nominal_peak_gflops": threads * mhz / 1e3 * per_cycle if per_cycle and mhz else None,
        "nominal_peak_basis": f"{threads} cores x {mhz / 1e3:.2f} GHz x {per_cycle} fp32 FLOP/cycle",
    }


def spread(values: list[float]) -> list[float]:
    return [min(values), max(values)]


def run_case(name: str, case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    batch = args.batch_32 if case.size == 32 else args.batch_224
    iterations = args.iterations_32 if case.size == 32 else args.iterations_224
    batch, iterations = batch or case.batch, iterations or case.iterations
    cfg = SynthConfig(method="intraq", iterations=iterations, batch_size=batch, amp=args.amp, compile=args.compile)
    shape = (3, case.size, case.size)
    labels = torch.arange(batch) % case.classes
    seeds = torch.arange(batch) + 12345
    teacher = case.model()
    flops = flops_per_image_iteration(case.model(), case.size)
    synth = Synthesizer(teacher, cfg, image_shape=shape, num_classes=case.classes, device=device)
    # Realistic MDC centres (from a first batch's clean features) so every term is active.
    store = ClassCentres(case.classes, int(synth.features(initial_noise(seeds[:2], shape)).shape[1]))
    store.update(synth.features(initial_noise(seeds + 999, shape)), labels)
    centres = store.snapshot(device)
    load = [round(os.getloadavg()[0], 2)]
    synth.synthesize(labels, seeds, 7, centres)  # warm-up (and compile, if enabled)
    reference = ReferenceProcess(name, args.threads, str(device))
    reference.seconds(cfg, labels, seeds, 7, centres)  # warm-up
    ours, ref, peaks = [], [], []
    work = batch * iterations
    for r in range(args.repeats):
        peaks.append(matmul_gflops())
        stamps: list[float] = []
        start = time.perf_counter()
        synth.synthesize(labels, seeds, 100 + r, centres, progress=lambda *_, s=stamps: s.append(time.perf_counter()))
        ours.append(work / (stamps[-1] - start))
        ref.append(work / reference.seconds(cfg, labels, seeds, 100 + r, centres))
        print(f"{name} repeat {r}: ours {ours[-1]:.1f} img-it/s, reference {ref[-1]:.1f} img-it/s", flush=True)
    load.append(round(os.getloadavg()[0], 2))
    reference.close()
    synth.close()
    peak = max(peaks)
    mo, mr = statistics.median(ours), statistics.median(ref)
    return {
        "case": name,
        "image_size": case.size,
        "batch": batch,
        "iterations": iterations,
        "gflop_per_image_iteration": flops / 1e9,
        "ours_img_it_per_s": ours,
        "reference_img_it_per_s": ref,
        "ours_median": mo,
        "ours_spread": spread(ours),
        "reference_median": mr,
        "reference_spread": spread(ref),
        "speedup_median": mo / mr,
        "ours_gflops": mo * flops / 1e9,
        "reference_gflops": mr * flops / 1e9,
        "matmul_peak_gflops": peak,
        "matmul_peak_gflops_per_repeat": peaks,
        "ours_fraction_of_peak": mo * flops / 1e9 / peak,
        "reference_fraction_of_peak": mr * flops / 1e9 / peak,
        "load_1min_before_after": load,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| case | batch × iterations | GFLOP / image·it | reference img·it/s (median, spread) | ours img·it/s "
        "(median, spread) | speed-up | ours GFLOP/s | of matmul peak | load before/after |\n"
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | --- |\n"
    )
    lines = [
        f"| {r['case']} | {r['batch']} × {r['iterations']} | {r['gflop_per_image_iteration']:.3f} | "
        f"{r['reference_median']:.1f} ({r['reference_spread'][0]:.1f}–{r['reference_spread'][1]:.1f}) | "
        f"{r['ours_median']:.1f} ({r['ours_spread'][0]:.1f}–{r['ours_spread'][1]:.1f}) | "
        f"{r['speedup_median']:.2f}× | {r['ours_gflops']:.1f} | {100 * r['ours_fraction_of_peak']:.0f}% "
        f"(of {r['matmul_peak_gflops']:.0f}) | {r['load_1min_before_after'][0]} / {r['load_1min_before_after'][1]} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--batch-32", type=int, default=None, help="batch at 32x32 (default 256)")
    ap.add_argument("--iterations-32", type=int, default=None, help="iterations at 32x32 (default 20)")
    ap.add_argument("--batch-224", type=int, default=None, help="batch at 224x224 (default 64 MobileNet, 8 ResNet-18)")
    ap.add_argument("--iterations-224", type=int, default=None, help="iterations at 224x224 (default 3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--allocator",
        default="reuse",
        choices=["reuse", "system"],
        help="C allocator while ours runs (the pipeline's cpu_allocator); the reference runs with glibc's defaults",
    )
    ap.add_argument("--out", default="benchmarks/results/gen_speed")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.allocator == "reuse":  # this process runs ours; the reference has its own
        reuse_freed_memory()
    device = torch.device(args.device)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    rows = [run_case(name, CASES[name], args, device) for name in names]
    dev_name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.machine()
    result = {
        "date": date.today().isoformat(),
        "device": args.device,
        "device_name": dev_name,
        "cpu": cpu_info(args.threads),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "repeats": args.repeats,
        "amp": args.amp,
        "compile": args.compile,
        "allocator_ours": args.allocator,
        "allocator_reference": "the C library's defaults (its own process)",
        "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode: forward + pixel-gradient backward",
        "peak_measured_by": "best of one timed 2048x2048 fp32 matmul (x3) per repeat, same threads",
        "cases": rows,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    print(markdown(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = f"{args.device}-{args.amp}{'-compile' if args.compile else ''}"
    suffix += "-system" if args.allocator == "system" else ""
    Path(f"{out}-{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
