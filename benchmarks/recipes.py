"""The accuracy recipe, part by part: quantizer ranges, block reconstruction, distillation, SynQ's options.

Every row trains (or only quantizes) the shared CIFAR-10 ResNet-20 on the same synthetic dataset
of the budget (a data row of ``benchmarks/ablation.py``, generated once per seed and shared with
the ablation), at W4A4 and W3A3 with ALL layers at those bits (the IntraQ/SynQ protocol), and
reports the FINAL model (or the data-free-selected one, see the 'selected' column) on the real
CIFAR-10 test set, with the starting point (after calibration or reconstruction) beside it. Each
(row, bits, seed) cell is one JSON file; finished cells are skipped. Examples::

    python -m benchmarks.recipes --budget cpu --seeds 0 1 --bits W4A4 W3A3
    python -m benchmarks.recipes --budget cpu --rows rec_ptq rec_kd --seeds 0
    python -m benchmarks.recipes --budget cpu --table
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.ablation import ROWS as DATA_ROWS
from benchmarks.harness import BUDGETS, REPO, Bench, fmt, parse_bits, provenance

#: The previous shipped recipe: min/max ranges, SGD-Nesterov lr 1e-3 with KD + hard-label CE.
REFERENCE = (
    "quant.method=minmax",
    "quant.weight_range=minmax",
    "quant.act_range=minmax",
    "distill.optimizer=sgd",
    "distill.lr=1e-3",
    "distill.ce_weight=1",
    "distill.select=final",
)
LP = ("quant.weight_range=lp", "quant.act_range=lp")
LSQ = ("quant.learn_act_scale=true", "quant.learn_weight_scale=true")
#: Block reconstruction as shipped: 500 iterations of 32 images per unit (recipe-choice-cpu.md).
REC = ("quant.method=reconstruct", *LP, "quant.reconstruct.iterations=500", "quant.reconstruct.batch_size=32")
#: The distillation of the new recipe: KD only, SGD-Nesterov at lr 1e-4 (cosine), the guard on.
KD = ("distill.optimizer=sgd", "distill.lr=1e-4", "distill.ce_weight=0", "distill.select=best")


@dataclass(frozen=True)
class Recipe:
    name: str
    label: str
    settings: tuple[str, ...]
    data: str = "bns_ce"


RECIPE_ROWS: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("reference", "min/max ranges + SGD lr 1e-3, KD + CE (previous shipped recipe)", REFERENCE),
        Recipe("lp_ptq", "Lp ranges (p = 2.4), no distillation", (*LP, "distill.epochs=0")),
        Recipe("lp_reference", "Lp ranges + the previous distillation (SGD lr 1e-3, KD + CE)", (*REFERENCE[3:], *LP)),
        Recipe("lp_lsq_kd", "Lp ranges + LSQ step sizes, KD only at lr 1e-4, guard", (*LP, *LSQ, *KD)),
        Recipe("rec_ptq", "block reconstruction (AdaRound + LSQ + QDrop), no distillation", (*REC, "distill.epochs=0")),
        Recipe("rec_kd", "block reconstruction + LSQ, KD only at lr 1e-4, guard", (*REC, *LSQ, *KD)),
        Recipe(
            "rec_kd_gated_ce",
            "… + SynQ's difficulty-gated CE (τ 0.5, weight 0.5)",
            (*REC, *LSQ, *KD, "distill.ce_weight=0.5", "distill.ce_difficulty_below=0.5"),
        ),
        Recipe(
            "rec_kd_lowpass", "… + SynQ's low-pass filter (cutoff 12)", (*REC, *LSQ, *KD, "distill.lowpass_cutoff=12")
        ),
        Recipe("rec_kd_cam", "… + SynQ's Grad-CAM alignment (weight 50)", (*REC, *LSQ, *KD, "distill.cam_weight=50")),
    ]
}


def run_cells(bench: Bench, names: list[str]) -> None:
    for name in names:
        recipe = RECIPE_ROWS[name]
        data_row = DATA_ROWS[recipe.data]
        for seed in bench.seeds:
            todo = [(b, p) for b in bench.bits if bench.force or not (p := _path(bench, recipe, b, seed)).exists()]
            if not todo:
                print(f"{name} seed {seed}: done already", flush=True)
                continue
            data, gen_s = bench.dataset(data_row, seed)
            for bits, path in todo:
                cell = bench._train_recipe(
                    data_row,
                    seed,
                    bits,
                    data,
                    recipe.name,
                    list(recipe.settings),
                    name=f"recipes-{recipe.data}-s{seed}",
                )
                result = {
                    **bench._base(data_row, bits, seed),
                    **{k: v for k, v in cell.items() if k != "ctx"},
                    "row": recipe.name,
                    "label": recipe.label,
                    "data_row": recipe.data,
                    "recipe_settings": list(recipe.settings),
                    "seconds": {**cell.get("seconds", {}), "generate": gen_s},
                }
                bench._save(path, result)


def _path(bench: Bench, recipe: Recipe, bits: tuple[int, int], seed: int) -> Path:
    return bench.results / f"{recipe.name}-W{bits[0]}A{bits[1]}-s{seed}.json"


def table(bench: Bench, bits_cols: list[str]) -> str:
    cells = bench.cells()
    seeds = sorted({r["seed"] for rs in cells.values() for r in rs})
    lines = [
        f"# The accuracy recipe on CIFAR-10 ResNet-20, budget `{bench.budget}`",
        "",
        f"Command: `python -m benchmarks.recipes --budget {bench.budget} --seeds {' '.join(map(str, seeds))}`.",
        f"Budget (run-config overrides): `{' '.join(BUDGETS[bench.budget])}`.",
        "Protocol: all layers at the named bits (weights per output channel, every post-ReLU activation; the "
        "image input in float), as in the IntraQ/SynQ tables. Data: the budget's BNS+CE synthetic images.",
        "",
    ]
    notes = bench.results / "NOTES.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += [
        "Top-1 (%) on the real CIFAR-10 test set (10,000 images) of the model the run reports (the final one, or the "
        "one the data-free guard kept); 'start': after range calibration or reconstruction, before distillation; "
        "mean ± std over seeds (n).",
        "",
        "| recipe | " + " | ".join(f"{b} | {b} start" for b in bits_cols) + " | n |",
        "| --- | " + " | ".join("---: | ---:" for _ in bits_cols) + " | ---: |",
    ]
    for name, recipe in RECIPE_ROWS.items():
        parts, n = [], 0
        for b in bits_cols:
            rs = cells.get((name, b), [])
            n = max(n, len(rs))
            parts += [fmt([r["top1_all"] for r in rs]), fmt([r["calibrated_top1_all"] for r in rs])]
        if n:
            lines.append(f"| {recipe.label} (`{name}`) | " + " | ".join(parts) + f" | {n} |")
    lines += ["", "## Per cell", "", _details(cells), "", provenance(cells)]
    return "\n".join(lines) + "\n"


def _details(cells: dict) -> str:
    rows = [
        "| recipe | bits | seed | top-1 | start | selected epoch | held-out KL start → end | probe agreement | "
        "prepare s | distil s | gen s |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (name, bits), rs in sorted(cells.items()):
        for r in sorted(rs, key=lambda r: r["seed"]):
            sel = r.get("selection") or {}
            evals = sel.get("evaluations") or []
            kl = f"{evals[0]['kl']:.4f} → {evals[-1]['kl']:.4f}" if evals else "–"
            chosen = sel.get("selected_epoch", "–") if sel else "–"
            chosen = "start" if sel and chosen is None else chosen
            sec = r.get("seconds") or {}
            rows.append(
                f"| {name} | {bits} | {r['seed']} | {r['top1_all']:.2f} | {r['calibrated_top1_all']:.2f} | {chosen} | "
                f"{kl} | {r.get('probe_agreement', 0):.1f} | {sec.get('calibrate', 0):.0f} | "
                f"{sec.get('distill', 0):.0f} | {sec.get('generate', 0):.0f} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description="The accuracy recipe, part by part (CIFAR-10 ResNet-20)")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--rows", nargs="*", default=list(RECIPE_ROWS), choices=list(RECIPE_ROWS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--bits", nargs="*", default=["W4A4", "W3A3"])
    ap.add_argument("--workdir", default=str(REPO / "runs" / "benchmarks"))
    ap.add_argument("--results", default=None, help="default: benchmarks/results/recipes-<budget>/")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true", help="recompute finished cells")
    ap.add_argument("--table", action="store_true", help="only rebuild the Markdown table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = Path(args.results or REPO / "benchmarks" / "results" / f"recipes-{args.budget}")
    bench = Bench(args.budget, {}, Path(args.workdir), results, args.seeds, parse_bits(args.bits), args.force, [])
    if not args.table:
        run_cells(bench, args.rows)
    if results.exists():
        text = table(bench, ["W4A4", "W3A3"])
        (results.parent / f"{results.name}.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
