"""Ablation of the IntraQ components on the shared CIFAR-10 ResNet-20 (W4A4 and W3A3).

Rows: FP; real-data PTQ (min/max, no fine-tuning); real-data distillation at the same budget
(upper bound); Gaussian noise; BNS+CE; BNS+CE with each of LOR, MDC, SIL (SIL replacing CE,
as in the paper's ablation); IntraQ (BNS+SIL+MDC+LOR); IntraQ with MDC swapped for ADI.

Each row's synthetic dataset is generated once per seed and reused for both bit widths;
each (row, bits, seed) cell is one JSON file, so rows can run separately and resume (see
``harness.py``). Examples::

    python benchmarks/ablation.py --budget cpu --rows intraq bns_ce --seeds 0 1
    python benchmarks/ablation.py --budget cpu --table      # rebuild the Markdown table only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.harness import BUDGETS, KEPT_MODEL, RECIPES, REPO, Bench, Row, fmt, parse_bits, provenance

ROWS: dict[str, Row] = {
    r.name: r
    for r in [
        Row("fp", "FP (no quantization)", "fp"),
        Row("ptq_real", "real-data PTQ (min/max, 512 real images, no fine-tuning)", "ptq_real"),
        Row("real_distill", "real-data distillation (upper bound)", "real"),
        Row("gaussian", "Gaussian noise", settings=("generate.method=gaussian",)),
        Row("bns_ce", "BNS+CE", settings=("generate.method=bns_ce",)),
        Row("bns_ce_lor", "BNS+CE + LOR", settings=("generate.method=bns_ce", "generate.lor=true")),
        Row("bns_ce_mdc", "BNS+CE + MDC", settings=("generate.method=bns_ce", "generate.mdc_weight=1")),
        Row(
            "bns_sil",
            "BNS+SIL (SIL instead of CE)",
            settings=("generate.method=custom", "generate.bns_weight=1", "generate.sil_weight=1"),
        ),
        Row("intraq", "IntraQ (BNS+SIL+MDC+LOR)", settings=("generate.method=intraq",)),
        Row("intraq_adi", "IntraQ with ADI instead of MDC", settings=("generate.method=adi",)),
    ]
}

RECIPE_NOTE = (
    "Distillation recipe: every cell trains each candidate recipe it was run with (`--recipes`; column 'candidates' "
    "below) from `benchmarks/harness.py` RECIPES (default = KD alpha 1, T 4, CE weight 1, SGD Nesterov lr 1e-3 "
    "cosine, crop+flip; kd_only = CE weight 0; bn_reestimate = BN statistics re-estimated on the synthetic data "
    "before distilling) and keeps the one with the highest teacher agreement on a shared data-free probe set "
    "(BN-statistics-only synthetic images no row trains on), then on the row's own held-out synthetic images. The "
    "test set only reports the chosen recipe (column 'recipe'). The reference's alpha = T = 20 with lr 1e-4 "
    "diverges on this teacher (docs/intraq-method.md §9) and is not a candidate."
)

#: Optional hand-written notes (the exact commands of each sitting, caveats), inserted under
#: the table's header when present in the results folder.
NOTES_FILE = "NOTES.md"


def table(bench: Bench, bits_cols: list[str]) -> str:
    cells = bench.cells()
    seeds = sorted({r["seed"] for rs in cells.values() for r in rs})
    head = " | ".join(f"{b} all | {b} held-out | {b} before distil" for b in bits_cols)
    lines = [
        f"# Ablation on CIFAR-10 ResNet-20, budget `{bench.budget}`",
        "",
        f"Command: `python -m benchmarks.ablation --budget {bench.budget} --seeds {' '.join(map(str, seeds))}` "
        "(rows, bits and recipes can be run separately: see the notes).",
        f"Budget (run-config overrides): `{' '.join(BUDGETS[bench.budget])}`.",
        "",
    ]
    notes = bench.results / NOTES_FILE
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += [
        f"Top-1 (%) of {KEPT_MODEL} on the real CIFAR-10 test set; mean ± std over seeds (n).",
        "'all': the 10,000 test images; 'held-out': the test images that no row trained or calibrated on "
        "(the real-data rows take their 'training' images from the test set: the shared data has no training set).",
        "'before distil': the quantized student after range calibration on the row's data, before distillation.",
        "",
        f"| row | {head} | n |",
        "| --- | " + " | ".join("---: | ---: | ---:" for _ in bits_cols) + " | ---: |",
    ]
    for name, row in ROWS.items():
        parts, n = [], 0
        for b in bits_cols:
            rs = cells.get((name, "FP" if row.kind == "fp" else b), [])
            n = max(n, len(rs))
            parts += [
                fmt([r["top1_all"] for r in rs]),
                fmt([r["top1_heldout"] for r in rs]),
                fmt([r["calibrated_top1_all"] for r in rs if "calibrated_top1_all" in r]),
            ]
        if n:
            lines.append(f"| {row.label} | " + " | ".join(parts) + f" | {n} |")
    lines += ["", RECIPE_NOTE, "", details(cells), ""]
    lines.append(provenance(cells))
    return "\n".join(lines) + "\n"


def details(cells: dict) -> str:
    """Per-cell diagnostics: data-free agreement, diversity statistics, MDC hinge, seconds."""
    rows = [
        "## Per cell",
        "",
        "Diversity: mean cosine distance of teacher penultimate features to their class mean ('centre', what "
        "MDC's hinge sees) and between pairs of the same class ('pairwise'), synthetic / real held-out test images.",
        "",
        "| row | bits | seed | all | held-out | recipe | probe agreement | held-out synthetic agreement | centre dist. "
        "| pairwise dist. | MDC hinge at end (lower, upper) | gen s | distil s | device | candidates |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | --- | ---: | ---: | --- | --- |",
    ]
    for (row, bits), rs in sorted(cells.items()):
        for r in sorted(rs, key=lambda r: r["seed"]):
            ds = r.get("dataset") or {}
            agree = (r.get("holdout_agreement_final") or {}).get("agreement")
            sec = r.get("seconds") or {}
            centre = f"{ds['centre_distance_synthetic']:.3f} / {ds['centre_distance_real']:.3f}" if ds else "–"
            pair = f"{ds['pairwise_distance_synthetic']:.3f} / {ds['pairwise_distance_real']:.3f}" if ds else "–"
            hinge = (
                f"{ds['mdc_final_lower']:.4f}, {ds['mdc_final_upper']:.4f}"
                if ds.get("mdc_final_lower") is not None
                else "–"
            )
            rows.append(
                f"| {row} | {bits} | {r['seed']} | {r['top1_all']:.2f} | {r['top1_heldout']:.2f} | "
                f"{r.get('recipe', '–')} | {_num(r.get('probe_agreement'))} | "
                f"{'–' if agree is None else f'{agree:.1f}'} | {centre} | {pair} | {hinge} | "
                f"{sec.get('generate', 0):.0f} | {sec.get('distill', 0):.0f} | {r.get('device', 'cpu')} | "
                f"{', '.join(r.get('recipe_candidates') or {}) or '–'} |"
            )
    return "\n".join(rows)


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description="IntraQ ablation on CIFAR-10 ResNet-20")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--bits", nargs="*", default=["W4A4", "W3A3"])
    ap.add_argument("--workdir", default=str(REPO / "runs" / "benchmarks"))
    ap.add_argument("--results", default=None, help="default: benchmarks/results/ablation-<budget>/")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true", help="recompute finished cells")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--table", action="store_true", help="only rebuild the Markdown table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = Path(args.results or REPO / "benchmarks" / "results" / f"ablation-{args.budget}")
    bench = Bench(
        args.budget, ROWS, Path(args.workdir), results, args.seeds, parse_bits(args.bits), args.force, args.recipes
    )
    if not args.table:
        bench.run(args.rows)
    if results.exists():
        text = table(bench, [f"W{w}A{a}" for w, a in bench.bits])
        (results.parent / f"{results.name}.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
