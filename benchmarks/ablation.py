"""Ablation of the IntraQ components on the shared CIFAR-10 ResNet-20 (W4A4 and W3A3).

Rows: FP; real-data PTQ (min/max, no fine-tuning); real-data distillation at the same budget
(upper bound); Gaussian noise; BNS+CE; BNS+CE with each of LOR, MDC, SIL (SIL replacing CE,
as in the paper's ablation); IntraQ (BNS+SIL+MDC+LOR); IntraQ with MDC swapped for ADI.

Every row uses the same pipeline code as ``intraq-pipeline run`` (local executor): generate
→ calibrate → distil → evaluate the FINAL model. One synthetic dataset per (row, seed) is
generated once and reused for both bit widths. Each (row, bits, seed) result is a JSON file
in the results folder, written when it finishes: rows can be run separately, in any order,
over several sittings, and finished cells are skipped (``--force`` recomputes).

    python benchmarks/ablation.py --budget cpu --rows intraq bns_ce --seeds 0 1
    python benchmarks/ablation.py --budget cpu --table          # (re)build the Markdown table

The shared data has no CIFAR-10 training set. The real-data rows therefore take their
"training" images from the CIFAR-10 test set (the first images of each class in canonical
order). Every row is reported on all 10,000 test images AND on the test images that no row
ever trained or calibrated on ("held-out"), which is the honest comparison for real rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from intraq_core.config import EvalConfig
from intraq_core.data import load_test_set
from intraq_core.quant import calibrate
from intraq_core.student import build_student, load_student
from intraq_core.synth import losses
from pipeline.config import RunConfig, load_run_config
from pipeline.context import RunContext
from pipeline.generate import dataset_storage, generate_local, new_manifest
from pipeline.shards import Manifest, read_shard, write_shard
from pipeline.train import STUDENT_PATH, train_local

REPO = Path(__file__).resolve().parent.parent

#: Scaled-down budgets. "cpu" fits generate + distil + evaluate of one configuration in
#: ≤ 30 min on 2 CPU cores; "full" is the reference generation budget (a GPU job).
BUDGETS: dict[str, list[str]] = {
    "cpu": [
        "generate.num_images=1280",
        "generate.batch_size=256",
        "generate.iterations=150",
        "generate.shards_per_round=1",
        "distill.epochs=60",
        "distill.batch_size=128",
        "quant.calibration_batches=8",
    ],
    "full": [
        "generate.num_images=5120",
        "generate.batch_size=256",
        "generate.iterations=1000",
        "generate.shards_per_round=1",
        "distill.epochs=100",
        "distill.batch_size=256",
    ],
}

#: Generation settings of each row (on top of the budget).
ROWS: dict[str, list[str]] = {
    "gaussian": ["generate.method=gaussian"],
    "bns_ce": ["generate.method=bns_ce"],
    "bns_ce_lor": ["generate.method=bns_ce", "generate.lor=true"],
    "bns_ce_mdc": ["generate.method=bns_ce", "generate.mdc_weight=1"],
    "bns_sil": ["generate.method=custom", "generate.bns_weight=1", "generate.sil_weight=1"],
    "intraq": ["generate.method=intraq"],
    "intraq_adi": ["generate.method=adi"],
}
SPECIAL_ROWS = ("fp", "ptq_real", "real_distill")
ALL_ROWS = (*SPECIAL_ROWS, *ROWS)

LABELS = {
    "fp": "FP (no quantization)",
    "ptq_real": "real-data PTQ (min/max, no fine-tuning)",
    "real_distill": "real-data distillation (upper bound)",
    "gaussian": "Gaussian noise",
    "bns_ce": "BNS+CE",
    "bns_ce_lor": "BNS+CE + LOR",
    "bns_ce_mdc": "BNS+CE + MDC",
    "bns_sil": "BNS+SIL (SIL instead of CE)",
    "intraq": "IntraQ (BNS+SIL+MDC+LOR)",
    "intraq_adi": "IntraQ with ADI instead of MDC",
}

#: Distillation recipe per row: chosen without the test set (see RECIPE_NOTE).
RECIPES: dict[str, list[str]] = {row: [] for row in ALL_ROWS}
RECIPE_NOTE = (
    "All rows use the stable recipe alpha 1, T 4, lr 1e-3 with cosine decay (the reference's "
    "alpha = T = 20, lr 1e-4 diverges on this teacher)."
)


@dataclass
class Split:
    """Indices of the real 'training' images (taken from the test set) and the held-out rest."""

    train: np.ndarray
    heldout: np.ndarray


def real_split(labels: np.ndarray, per_class: int) -> Split:
    """The first ``per_class`` test images of each class, in canonical order, are 'training'."""
    chosen = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(int(labels.max()) + 1)])
    mask = np.zeros(len(labels), dtype=bool)
    mask[chosen] = True
    return Split(np.sort(chosen), np.flatnonzero(~mask))


@dataclass
class Bench:
    budget: str
    workdir: Path
    results: Path
    seeds: list[int]
    bits: list[tuple[int, int]]
    force: bool = False
    _cache: dict[str, Any] = field(default_factory=dict)

    def config(self, row: str, seed: int, extra: list[str] | None = None) -> RunConfig:
        sets = [
            *BUDGETS[self.budget],
            *ROWS.get(row, []),
            *RECIPES.get(row, []),
            f"seed={seed}",
            "executor=local",
        ]
        return load_run_config(None, [*sets, *(extra or [])])

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        if "test" not in self._cache:
            cfg = RunConfig()
            ctx = RunContext.create(cfg)
            ts = load_test_set(EvalConfig(data=cfg.eval.data), ctx.model_cfg)
            xs, ys = zip(*ts.batches(1000), strict=True)
            self._cache["test"] = (torch.cat(xs), torch.cat(ys))
        return self._cache["test"]

    @property
    def split(self) -> Split:
        if "split" not in self._cache:
            n = self.config("intraq", 0).generate.num_images
            self._cache["split"] = real_split(self.test[1].numpy(), per_class=-(-n // 10))
        return self._cache["split"]

    def accuracy(self, model: torch.nn.Module) -> dict[str, float]:
        x, y = self.test
        model.eval()
        correct = []
        with torch.no_grad():
            for s in range(0, x.shape[0], 1000):
                correct.append(model(x[s : s + 1000]).argmax(1) == y[s : s + 1000])
        c = torch.cat(correct).numpy()
        return {"top1_all": 100.0 * c.mean(), "top1_heldout": 100.0 * c[self.split.heldout].mean()}

    # -- datasets ---------------------------------------------------------------------------
    def dataset(self, row: str, seed: int) -> tuple[Path, float]:
        """Generate (or reuse) the synthetic dataset of a row; returns (location, seconds)."""
        loc = self.workdir / self.budget / f"{row}-s{seed}"
        cfg = self.config(row, seed, [f"storage.url={loc}"])
        if row == "real_distill":
            return self._real_dataset(cfg, loc), 0.0
        ctx = RunContext.create(cfg)
        t0 = time.perf_counter()
        generate_local(ctx, progress=True)
        return loc, time.perf_counter() - t0

    def _real_dataset(self, cfg: RunConfig, loc: Path) -> Path:
        """The real 'training' images written as one dataset in the shard format."""
        ctx = RunContext.create(cfg)
        storage = dataset_storage(ctx)
        if Manifest.exists(storage) and Manifest.load(storage).is_complete():
            return loc
        x, y = self.test
        idx = self.split.train
        teacher = ctx.teacher()
        manifest = new_manifest(ctx, 1)
        with torch.no_grad():
            from intraq_core.models.introspect import FeatureTap

            tap = FeatureTap(teacher)
            teacher(x[idx])
            feats = tap.features.numpy()
            tap.remove()
        meta = {
            "round": 0,
            "config_hash": cfg.dataset_hash(),
            "teacher_sha256": ctx.teacher_sha256,
            "mean": list(ctx.model_cfg.mean or ()),
            "std": list(ctx.model_cfg.std or ()),
            "num_classes": 10,
            "seed": 0,
            "method": "real",
        }
        info = write_shard(storage, 0, x[idx].numpy(), y[idx].numpy(), idx, idx, meta, features=feats)
        manifest.add_shard(info, round=0)
        manifest.save(storage)
        return loc

    # -- rows --------------------------------------------------------------------------------
    def cell_path(self, row: str, bits: tuple[int, int], seed: int) -> Path:
        tag = "fp" if row == "fp" else f"W{bits[0]}A{bits[1]}"
        return self.results / f"{row}-{tag}-s{seed}.json"

    def run_row(self, row: str) -> None:
        for seed in self.seeds:
            cells = [(b, self.cell_path(row, b, seed)) for b in (self.bits if row != "fp" else [(32, 32)])]
            todo = [(b, p) for b, p in cells if self.force or not p.exists()]
            if not todo:
                print(f"{row} seed {seed}: done already", flush=True)
                continue
            if row == "fp":
                self._save(todo[0][1], self._fp(seed))
                continue
            if row == "ptq_real":
                for b, p in todo:
                    self._save(p, self._ptq_real(b, seed))
                continue
            loc, gen_s = self.dataset(row, seed)
            for b, p in todo:
                self._save(p, self._train(row, seed, b, loc, gen_s))

    def _save(self, path: Path, result: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(
            json.dumps({k: result[k] for k in ("row", "bits", "seed", "top1_all", "top1_heldout")}),
            flush=True,
        )

    def _base(self, row: str, bits: tuple[int, int], seed: int) -> dict[str, Any]:
        return {
            "row": row,
            "label": LABELS[row],
            "bits": "FP" if row == "fp" else f"W{bits[0]}A{bits[1]}",
            "seed": seed,
            "budget": self.budget,
            "budget_settings": BUDGETS[self.budget],
            "row_settings": ROWS.get(row, []) + RECIPES.get(row, []),
            "machine": machine(),
            "date": date.today().isoformat(),
            "commit": git_commit(),
        }

    def _fp(self, seed: int) -> dict[str, Any]:
        teacher = RunContext.create(self.config("intraq", seed)).teacher()
        return {**self._base("fp", (32, 32), seed), **self.accuracy(teacher)}

    def _ptq_real(self, bits: tuple[int, int], seed: int) -> dict[str, Any]:
        """Min/max ranges on 512 real 'training' images, no fine-tuning."""
        t0 = time.perf_counter()
        ctx = RunContext.create(self.config("ptq_real", seed, [f"quant.w_bits={bits[0]}", f"quant.a_bits={bits[1]}"]))
        student = build_student(ctx.teacher(), ctx.cfg.quant)
        x = self.test[0][self.split.train[:512]]
        calibrate(student, [x[s : s + 128] for s in range(0, 512, 128)])
        return {
            **self._base("ptq_real", bits, seed),
            **self.accuracy(student),
            "seconds": {"total": time.perf_counter() - t0},
        }

    def _train(self, row: str, seed: int, bits: tuple[int, int], data: Path, gen_s: float) -> dict[str, Any]:
        loc = self.workdir / self.budget / f"{row}-s{seed}" / f"w{bits[0]}a{bits[1]}"
        cfg = self.config(
            row,
            seed,
            [f"storage.url={loc}", f"dataset={data}", f"quant.w_bits={bits[0]}", f"quant.a_bits={bits[1]}"],
        )
        ctx = RunContext.create(cfg)
        manifest = Manifest.load(dataset_storage(ctx))
        outcome = train_local(ctx, manifest, progress=True)
        calibrated, _, _, _ = load_student(ctx.storage.read_bytes("student_calibrated.pt"))
        final, _, _, _ = load_student(ctx.storage.read_bytes(STUDENT_PATH))
        t0 = time.perf_counter()
        acc_final = self.accuracy(final)
        eval_s = time.perf_counter() - t0
        acc_cal = self.accuracy(calibrated)
        stats = dataset_statistics(ctx, manifest, self.test, self.split)
        return {
            **self._base(row, bits, seed),
            **acc_final,
            "calibrated_top1_all": acc_cal["top1_all"],
            "calibrated_top1_heldout": acc_cal["top1_heldout"],
            "holdout_agreement_calibrated": outcome.agreement_calibrated,
            "holdout_agreement_final": outcome.agreement_final,
            "final_epoch": outcome.history[-1] if outcome.history else None,
            "diverged": any(not np.isfinite(e["loss"]) for e in outcome.history),
            "dataset": stats,
            "seconds": {
                "generate": gen_s,
                "calibrate": outcome.seconds_calibrate,
                "distill": outcome.seconds_distill,
                "evaluate": eval_s,
            },
        }

    # -- table -------------------------------------------------------------------------------
    def table(self) -> str:
        cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for p in sorted(self.results.glob("*.json")):
            r = json.loads(p.read_text())
            cells.setdefault((r["row"], r["bits"]), []).append(r)
        bits_cols = ["W4A4", "W3A3"]
        seeds = " ".join(map(str, self.seeds))
        lines = [
            f"# Ablation on CIFAR-10 ResNet-20, budget `{self.budget}`",
            "",
            f"Command: `python benchmarks/ablation.py --budget {self.budget} --seeds {seeds}` then `--table`. "
            f"Budget: `{' '.join(BUDGETS[self.budget])}`.",
            "",
            "Top-1 (%) of the FINAL model on the real CIFAR-10 test set, mean ± std over seeds (n = seeds).",
            "'all' = 10,000 test images; 'held-out' = the test images no row trained or calibrated on.",
            "",
            "| row | "
            + " | ".join(f"{b} all | {b} held-out | {b} calibrated (before distil)" for b in bits_cols)
            + " | n |",
            "| --- | " + " | ".join("---: | ---: | ---:" for _ in bits_cols) + " | ---: |",
        ]
        for row in ALL_ROWS:
            parts = []
            n = 0
            for b in bits_cols:
                rs = cells.get((row, "FP" if row == "fp" else b), [])
                n = max(n, len(rs))
                parts.append(_fmt([r["top1_all"] for r in rs]))
                parts.append(_fmt([r["top1_heldout"] for r in rs]))
                parts.append(_fmt([r["calibrated_top1_all"] for r in rs if "calibrated_top1_all" in r]))
            if n:
                lines.append(f"| {LABELS[row]} | " + " | ".join(parts) + f" | {n} |")
        lines += ["", RECIPE_NOTE, ""]
        machines = sorted({r["machine"] for rs in cells.values() for r in rs})
        dates = sorted({r["date"] for rs in cells.values() for r in rs})
        lines.append(f"Machines: {'; '.join(machines)}. Dates: {', '.join(dates)}.")
        lines += ["", "## Per cell", "", _details(cells)]
        return "\n".join(lines) + "\n"


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _details(cells: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    rows = [
        "| row | bits | seed | all | held-out | holdout agreement | MDC: dist. to centre (synthetic / real) "
        "| pairwise intra-class dist. (synthetic / real) | final MDC hinge | gen s | distil s |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: |",
    ]
    for (row, bits), rs in sorted(cells.items()):
        for r in sorted(rs, key=lambda r: r["seed"]):
            ds = r.get("dataset") or {}
            agree = (r.get("holdout_agreement_final") or {}).get("agreement")
            sec = r.get("seconds") or {}
            rows.append(
                f"| {row} | {bits} | {r['seed']} | {r['top1_all']:.2f} | {r['top1_heldout']:.2f} | "
                f"{'–' if agree is None else f'{agree:.1f}'} | "
                f"{_pair(ds.get('centre_distance_synthetic'), ds.get('centre_distance_real'))} | "
                f"{_pair(ds.get('pairwise_distance_synthetic'), ds.get('pairwise_distance_real'))} | "
                f"{ds.get('mdc_final', '–')} | {sec.get('generate', 0):.0f} | {sec.get('distill', 0):.0f} |"
            )
    return "\n".join(rows)


def _pair(a: float | None, b: float | None) -> str:
    if a is None:
        return "–"
    return f"{a:.3f} / {b:.3f}"


def dataset_statistics(
    ctx: RunContext, manifest: Manifest, test: tuple[torch.Tensor, torch.Tensor], split: Split
) -> dict[str, Any]:
    """Diversity of the synthetic features vs real test images, and what MDC's hinge did."""
    storage = dataset_storage(ctx)
    feats, labels, mdc = [], [], []
    for entry in manifest.shards:
        shard = read_shard(storage, entry.path)
        feats.append(shard.features)
        labels.append(shard.labels)
        fl = shard.meta.get("final_losses") or {}
        if "mdc_lower" in fl:
            mdc.append((fl["mdc_lower"], fl["mdc_upper"]))
    f = torch.from_numpy(np.concatenate(feats))
    y = torch.from_numpy(np.concatenate(labels))
    teacher = ctx.teacher()
    from intraq_core.models.introspect import FeatureTap

    idx = split.heldout[:2000]
    with torch.no_grad(), FeatureTap(teacher) as tap:
        teacher(test[0][idx])
        real = tap.features
    ry = test[1][idx]
    return {
        "centre_distance_synthetic": losses.mean_distance_to_class_centre(f, y),
        "centre_distance_real": losses.mean_distance_to_class_centre(real, ry),
        "pairwise_distance_synthetic": losses.mean_intra_class_cosine_distance(f, y),
        "pairwise_distance_real": losses.mean_intra_class_cosine_distance(real, ry),
        "mdc_final": "–"
        if not mdc
        else f"lower {np.mean([m[0] for m in mdc]):.4f}, upper {np.mean([m[1] for m in mdc]):.4f}",
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description="IntraQ ablation on CIFAR-10 ResNet-20")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--rows", nargs="*", default=list(ALL_ROWS), choices=list(ALL_ROWS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--bits", nargs="*", default=["W4A4", "W3A3"])
    ap.add_argument("--workdir", default=str(REPO / "runs" / "ablation"))
    ap.add_argument("--results", default=None, help="default: benchmarks/results/ablation-<budget>")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--table", action="store_true", help="only rebuild the Markdown table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bits = []
    for b in args.bits:
        w, a = b.upper().removeprefix("W").split("A")
        bits.append((int(w), int(a)))
    results = Path(args.results or REPO / "benchmarks" / "results" / f"ablation-{args.budget}")
    bench = Bench(args.budget, Path(args.workdir), results, args.seeds, bits, args.force)
    if not args.table:
        for row in args.rows:
            bench.run_row(row)
    if results.exists():
        table = bench.table()
        (results.parent / f"ablation-{args.budget}.md").write_text(table)
        print(table)


if __name__ == "__main__":
    main()
