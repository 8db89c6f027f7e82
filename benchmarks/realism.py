"""A data-free realism signal of synthetic images: the teacher's BN statistics on re-batched images.

The probe agreement, the cross held-out KL and the tie-break probe score *students*; the one piece
of real data a data-free user holds is the teacher's BN running statistics, and this signal scores
the *images* against them (declared with its adoption criteria before it ran:
``benchmarks/results/realism/declared.md``). R = the mean over batches of the synthesis loss
:func:`intraq_core.synth.losses.bns_loss` (mean part + variance part) of the teacher on the
dataset's images in a seeded permutation, cut into batches of ``batch_size`` (a last partial batch
dropped): across classes, so no batch is one the synthesis optimized. Lower is closer to the
teacher's real-data statistics; real images of the teacher's domain are the reference.

Example (the config names the teacher and, for ``--real``, its test set)::

    python -m benchmarks.realism -c configs/imagenet_mobilenetv1_025_w4a4_cpu.yaml --real 1300 \\
        "BNS+CE 1024 x 60, seed 0=/work/ship/data-s0" "IntraQ 256 x 240, seed 0=/work/ipc/data-intraq-n256-s0"

A LOCATION is a dataset folder (its ``manifest.json``) or a run folder holding ``data/``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Seed of the permutation that re-batches every dataset (the same for all of them).
PERMUTATION_SEED = 0


@torch.no_grad()
def bn_distance(
    teacher: nn.Module, images: torch.Tensor, batch_size: int = 128, seed: int = PERMUTATION_SEED
) -> dict[str, Any]:
    """R of ``images`` (normalized, the teacher's input): the mean over re-batched batches of the
    BN-statistics loss, with its mean and variance parts and the number of batches.

    Raises ``ValueError`` when there are fewer images than one batch.
    """
    from intraq_core.synth.bn_stats import BNStats
    from intraq_core.synth.losses import bns_loss

    n = images.shape[0] // batch_size
    if n == 0:
        raise ValueError(f"{images.shape[0]} images are fewer than one batch of {batch_size}")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    teacher = teacher.eval()
    stats = BNStats(teacher)
    parts = []
    try:
        for b in range(n):
            stats.clear()
            teacher(images[order[b * batch_size : (b + 1) * batch_size]].float())
            mean_part, var_part = bns_loss(stats.means, stats.vars, stats.running_means, stats.running_vars)
            parts.append((float(mean_part), float(var_part)))
    finally:
        stats.remove()
    mean = sum(p[0] for p in parts) / n
    var = sum(p[1] for p in parts) / n
    return {"R": mean + var, "mean_part": mean, "var_part": var, "batches": n, "images": n * batch_size}


def real_images(ctx: Any, count: int, seed: int = PERMUTATION_SEED) -> torch.Tensor:
    """``count`` images of the config's test set (``eval``), preprocessed as the evaluation does,
    drawn by a seeded permutation (all of them when ``count`` is not smaller)."""
    from intraq_core.data import load_test_set

    test_set = load_test_set(ctx.cfg.eval, ctx.model_cfg)
    images = torch.cat([x for x, _ in test_set.batches(256)])
    if count < images.shape[0]:
        images = images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:count]]
    return images


def table(results: list[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table of ``(label, bn_distance result)``, in the given order."""
    lines = ["| dataset | images | R | mean part | variance part |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, r in results:
        lines.append(f"| {label} | {r['images']} | {r['R']:.4f} | {r['mean_part']:.4f} | {r['var_part']:.4f} |")
    return "\n".join(lines)


def real_check(real: float, results: list[tuple[str, dict[str, Any]]]) -> str:
    """Whether the real images score a lower R than every synthetic dataset (the sanity check of a
    realism signal), naming those that score lower."""
    below = [f"{label} ({r['R']:.4f})" for label, r in results if r["R"] <= real]
    if not below:
        return f"Real images score the lowest R ({real:.4f}): lower than all {len(results)} synthetic datasets."
    return f"Real images ({real:.4f}) do **not** score the lowest R: {', '.join(below)} score lower or equal."


def setting_of(label: str) -> str:
    """The setting a label names without its seed (``"X, seed 1"`` -> ``"X"``)."""
    return re.sub(r",? seed \d+$", "", label)


def kept_top1(path: str | Path) -> float:
    """Test top-1 of the model a run kept, from a study cell (``top1_all``) or a run's ``metrics.json``."""
    m = json.loads(Path(path).read_text())
    return float(m["top1_all"] if "top1_all" in m else m["quant_top1"])


def separated_pairs(r: dict[str, list[float]], top1: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Every pair of settings with R and two or more test top-1 values each whose test means differ by
    more than the larger seed standard deviation (the studies' "separated"), with whether the lower
    mean R belongs to the higher test mean (``agrees``)."""
    settings = [k for k in r if len(top1.get(k, [])) >= 2]
    out = []
    for a, b in itertools.combinations(settings, 2):
        diff = statistics.mean(top1[a]) - statistics.mean(top1[b])
        if abs(diff) <= max(statistics.stdev(top1[a]), statistics.stdev(top1[b])):
            continue
        high, low = (a, b) if diff > 0 else (b, a)
        out.append({"high": high, "low": low, "agrees": statistics.mean(r[high]) < statistics.mean(r[low])})
    return out


def pairs_table(pairs: list[dict[str, Any]], r: dict[str, list[float]], top1: dict[str, list[float]]) -> str:
    """A markdown table of :func:`separated_pairs` with the means it compares, and the count that agree."""

    def cell(values: list[float], digits: int) -> str:
        sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.{digits}f}{sd}"

    lines = [
        "| higher test top-1 | lower test top-1 | test top-1 (higher vs lower) | R (higher vs lower) | R agrees |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in pairs:
        h, lo = p["high"], p["low"]
        lines.append(
            f"| {h} | {lo} | {cell(top1[h], 2)} vs {cell(top1[lo], 2)} | {cell(r[h], 4)} vs {cell(r[lo], 4)} "
            f"| {'yes' if p['agrees'] else '**no**'} |"
        )
    agree = sum(p["agrees"] for p in pairs)
    return "\n".join([*lines, "", f"R agrees with the test set on {agree} of {len(pairs)} separated pairs."])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realism", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True, help="run config naming the teacher (and its test set)")
    parser.add_argument("datasets", nargs="*", metavar="LABEL=LOCATION", help="datasets to score")
    parser.add_argument("--real", type=int, default=0, metavar="N", help="also score N real test-set images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument(
        "--top1",
        nargs="*",
        default=[],
        metavar="SETTING=FILE[,FILE]",
        help="test top-1 of a setting's students (study cells or metrics.json, one per seed): adds the "
        "separated pairs and whether R orders them as the test set does",
    )
    args = parser.parse_args(argv)

    from benchmarks.crossprobe import dataset_images
    from pipeline.config import load_run_config
    from pipeline.context import RunContext, limit_threads

    limit_threads(1)
    ctx = RunContext.create(load_run_config(args.config))
    teacher = ctx.teacher()
    results: list[tuple[str, dict[str, Any]]] = []
    if args.real:
        results.append(
            (f"real test images ({args.real})", bn_distance(teacher, real_images(ctx, args.real), args.batch_size))
        )
    for item in args.datasets:
        label, sep, location = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected LABEL=LOCATION")
        results.append(
            (label, {**bn_distance(teacher, dataset_images(location), args.batch_size), "location": location})
        )
        print(f"{label}: R {results[-1][1]['R']:.4f}", file=sys.stderr, flush=True)
    print(table(results))
    if args.real:
        print()
        print(real_check(results[0][1]["R"], results[1:]))
    if args.top1:
        r: dict[str, list[float]] = {}
        for label, res in results:
            r.setdefault(setting_of(label), []).append(res["R"])
        top1: dict[str, list[float]] = {}
        for item in args.top1:
            setting, sep, files = item.partition("=")
            if not sep or setting not in r:
                parser.error(f"{item!r}: expected SETTING=FILE[,FILE] with SETTING one of {sorted(r)}")
            top1[setting] = [kept_top1(f) for f in files.split(",")]
        print()
        print(pairs_table(separated_pairs(r, top1), r, top1))
    if args.json:
        args.json.write_text(json.dumps(dict(results), indent=1) + "\n")


if __name__ == "__main__":
    main()
