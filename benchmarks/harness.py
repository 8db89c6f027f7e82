"""Shared harness of the accuracy benchmarks: budgets, rows, cells, real-data split, statistics.

A *row* is one way of producing training data (a synthetic method, real images, or none:
``datafree`` rows such as SQuant build the student without any image); a *cell* is (row, bit
width, seed). Every cell runs the product's own code path
(``generate_local`` → ``train_local`` with the run config of the budget + row), evaluates
the kept model (:data:`KEPT_MODEL`) on the real CIFAR-10 test set and is saved as one JSON file as soon as it
finishes, so studies can be built over several sittings; finished cells are skipped.

The shared data has no CIFAR-10 training set. Real-data rows therefore take their
"training" images from the test set (the first images of each class in canonical order).
Every cell is reported on all 10,000 test images and on the "held-out" test images that
no row ever trained or calibrated on.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from intraq_core.config import EvalConfig
from intraq_core.data import load_test_set
from intraq_core.models.introspect import FeatureTap
from intraq_core.quant import calibrate_ranges
from intraq_core.student import build_student, load_student
from intraq_core.synth import losses
from pipeline.config import RunConfig, load_run_config
from pipeline.context import RunContext
from pipeline.stages.generate import generate_local, new_manifest
from pipeline.stages.train import CALIBRATED_PATH, STUDENT_PATH, train_local
from pipeline.storage.manifest import Manifest
from pipeline.storage.shards import read_shard, write_shard

REPO = Path(__file__).resolve().parent.parent

#: What the tables' top-1 is of (under the shipped recipe, distill.select=best).
KEPT_MODEL = (
    "the model the run kept (the final one, or under the shipped recipe the earlier epoch the data-free guard kept)"
)

#: Budgets. "cpu" fits generate + distil + evaluate of one configuration in ≤ 30 min on
#: 2 CPU cores; "full" is the reference generation budget (a GPU job); "tiny" checks the
#: harness itself in seconds (its numbers mean nothing).
BUDGETS: dict[str, list[str]] = {
    "cpu": [
        "generate.num_images=1280",
        "generate.batch_size=256",
        "generate.iterations=150",
        "generate.shards_per_round=1",
        "generate.clip_pixels=true",
        "distill.epochs=120",
        "distill.batch_size=128",
        "quant.calibration_batches=8",
        # gdfq / qimera rows only: the generator's training budget (~7 min on 2 cores).
        "generate.generator_iterations=400",
        "generate.generator_batch_size=64",
    ],
    "full": [
        "generate.num_images=5120",
        "generate.batch_size=256",
        "generate.iterations=1000",
        "generate.shards_per_round=1",
        "distill.epochs=100",
        "distill.batch_size=256",
        "generate.generator_iterations=8000",
        "generate.generator_batch_size=200",
    ],
    "tiny": [
        "generate.num_images=40",
        "generate.batch_size=20",
        "generate.iterations=3",
        "generate.shards_per_round=1",
        "distill.epochs=1",
        "distill.batch_size=16",
        "quant.calibration_batches=1",
        "eval.limit=500",
        "generate.generator_iterations=3",
        "generate.generator_batch_size=8",
    ],
}


#: Candidate distillation recipes. Each cell trains every candidate and keeps the one with
#: the best data-free score (teacher agreement on the probe set, then on the row's own
#: held-out synthetic images); the test set is only used to report the chosen one.
RECIPES: dict[str, list[str]] = {
    "default": [],
    "kd_only": ["distill.ce_weight=0"],
    "bn_reestimate": ["distill.bn=reestimate"],
    # The recipe of the shipped CPU configs (configs/cifar10_resnet20_w4a4_cpu.yaml, chosen in
    # benchmarks/results/recipe-choice-cpu.md): Lp ranges, LSQ steps, block reconstruction 500x32,
    # KD-only SGD lr 1e-4 for 40 epochs, the data-free guard. Run it alone (``--recipes shipped``)
    # into its own results folder: the cells of the other recipes are kept apart from it.
    "shipped": [
        "quant.method=reconstruct",
        "quant.weight_range=lp",
        "quant.act_range=lp",
        "quant.learn_weight_scale=true",
        "quant.learn_act_scale=true",
        "quant.reconstruct.iterations=500",
        "quant.reconstruct.batch_size=32",
        "quant.reconstruct.num_images=1024",
        "distill.optimizer=sgd",
        "distill.lr=1e-4",
        "distill.ce_weight=0",
        "distill.epochs=40",
        "distill.select=best",
    ],
}

#: The data-free probe set: BN-statistics-only synthetic images (no class term, LOR on),
#: generated once per budget with a fixed seed and shared by every row, so recipes of
#: different rows are judged on the same inputs, none of which any row trains on.
PROBE_SETTINGS = (
    "generate.method=custom",
    "generate.bns_weight=1",
    "generate.lor=true",
    "generate.num_images=512",
)
PROBE_SEED = 12345


@dataclass(frozen=True)
class Row:
    """How a row gets its training data, and the config keys that define it."""

    name: str
    label: str
    kind: Literal["synthetic", "fp", "ptq_real", "real", "datafree"] = "synthetic"
    settings: tuple[str, ...] = ()
    #: Train on the dataset of this row (same generation settings) instead of generating one.
    data_row: str | None = None


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


def parse_bits(items: list[str]) -> list[tuple[int, int]]:
    out = []
    for b in items:
        w, a = b.upper().removeprefix("W").split("A")
        out.append((int(w), int(a)))
    return out


def write_real_dataset(
    ctx: RunContext, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray, *, store_dtype: str = "float32"
) -> None:
    """Real images (normalized, ``[N, C, H, W]``) written as a one-shard dataset of ``ctx`` in the
    shard format, the teacher's features included like a generated one, so the train stage runs on
    them unchanged (the real-data rows here, ``benchmarks/real_split.py``)."""
    teacher = ctx.teacher()
    with torch.no_grad(), FeatureTap(teacher) as tap:
        teacher(images)
        features = tap.features.numpy()
    meta = {
        "round": 0,
        "config_hash": ctx.cfg.dataset_hash(),
        "teacher_sha256": ctx.teacher_sha256,
        "mean": list(ctx.model_cfg.mean or ()),
        "std": list(ctx.model_cfg.std or ()),
        "num_classes": ctx.num_classes,
        "seed": 0,
        "method": "real",
    }
    storage = ctx.dataset_storage
    manifest = new_manifest(ctx, 1)
    info = write_shard(
        storage, 0, images.numpy(), labels.numpy(), indices, indices, meta, features=features, store_dtype=store_dtype
    )
    manifest.add_shard(info, round=0)
    manifest.save(storage)


@dataclass
class Bench:
    """Runs cells of a study and writes one JSON result per cell."""

    budget: str
    rows: dict[str, Row]
    workdir: Path
    results: Path
    seeds: list[int]
    bits: list[tuple[int, int]]
    force: bool = False
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    #: The teacher's settings (``model.arch=...``, ``model.weights=...``); empty: the default
    #: teacher, the shared CIFAR-10 ResNet-20.
    model: tuple[str, ...] = ()
    _cache: dict[str, Any] = field(default_factory=dict)

    def settings(self, row: Row, seed: int, recipe: list[str] | tuple[str, ...] = ()) -> list[str]:
        """The run settings of a row, in order: the budget, the teacher (:attr:`model`), the recipe,
        the row's own (which win over the recipe's for the keys they name: a row that is
        SQuant-started stays so under every recipe), the seed."""
        return [*BUDGETS[self.budget], *self.model, *recipe, *row.settings, f"seed={seed}", "executor=local"]

    def config(
        self, row: Row, seed: int, extra: list[str] | None = None, recipe: list[str] | tuple[str, ...] = ()
    ) -> RunConfig:
        """The run config of :meth:`settings` plus ``extra`` (locations, bits)."""
        return load_run_config(None, [*self.settings(row, seed, recipe), *(extra or [])])

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "test" not in self._cache:
            cfg = load_run_config(None, [*BUDGETS[self.budget], *self.model])
            ctx = RunContext.create(cfg)
            ts = load_test_set(EvalConfig(data=cfg.eval.data, limit=cfg.eval.limit), ctx.model_cfg)
            xs, ys = zip(*ts.batches(1000), strict=True)
            self._cache["test"] = (torch.cat(xs), torch.cat(ys))
        return self._cache["test"]

    @property
    def split(self) -> Split:
        if "split" not in self._cache:
            n = load_run_config(None, BUDGETS[self.budget]).generate.num_images
            self._cache["split"] = real_split(self.test[1].numpy(), per_class=-(-n // 10))
        return self._cache["split"]

    @torch.no_grad()
    def accuracy(self, model: torch.nn.Module) -> dict[str, float]:
        x, y = self.test
        model = model.to(self.device).eval()
        correct = []
        for s in range(0, x.shape[0], 1000):
            correct.append(model(x[s : s + 1000].to(self.device)).argmax(1).cpu() == y[s : s + 1000])
        c = torch.cat(correct).numpy()
        return {"top1_all": 100.0 * float(c.mean()), "top1_heldout": 100.0 * float(c[self.split.heldout].mean())}

    # -- cells -------------------------------------------------------------------------------
    def cell_path(self, row: Row, bits: tuple[int, int], seed: int) -> Path:
        tag = "FP" if row.kind == "fp" else f"W{bits[0]}A{bits[1]}"
        return self.results / f"{row.name}-{tag}-s{seed}.json"

    def run(self, names: list[str]) -> None:
        for name in names:
            self.run_row(self.rows[name])

    def run_row(self, row: Row) -> None:
        for seed in self.seeds:
            bits_list = [(32, 32)] if row.kind == "fp" else self.bits
            todo = [(b, p) for b in bits_list if self.force or not (p := self.cell_path(row, b, seed)).exists()]
            if not todo:
                print(f"{row.name} seed {seed}: done already", flush=True)
                continue
            if row.kind == "fp":
                self._save(todo[0][1], self._fp(row, seed))
                continue
            if row.kind == "ptq_real":
                for b, p in todo:
                    self._save(p, self._ptq_real(row, b, seed))
                continue
            if row.kind == "datafree":
                for b, p in todo:
                    self._save(p, self._datafree(row, b, seed))
                continue
            loc, gen_s = self.dataset(row, seed)
            for b, p in todo:
                self._save(p, self._train(row, seed, b, loc, gen_s))

    def data_location(self, row: Row, seed: int) -> Path:
        """Where the dataset of a row at ``seed`` is generated (the row it shares data with, if any)."""
        return self.workdir / self.budget / f"{row.data_row or row.name}-s{seed}"

    def dataset_complete(self, row: Row, seed: int) -> bool:
        """Whether the dataset of a row at ``seed`` is fully written (a generation still running has a
        manifest already, with its shards so far)."""
        loc = self.data_location(row, seed)
        if not (loc / "data" / "manifest.json").is_file():
            return False
        storage = RunContext.create(self.config(row, seed, [f"storage.url={loc}"])).dataset_storage
        return Manifest.load(storage).is_complete()

    def dataset(self, row: Row, seed: int) -> tuple[Path, float]:
        """Generate (or reuse) the dataset of a row; returns (location, generation seconds)."""
        loc = self.data_location(row, seed)
        cfg = self.config(row, seed, [f"storage.url={loc}"])
        if row.kind == "real":
            return self._real_dataset(cfg, loc), 0.0
        ctx = RunContext.create(cfg)
        t0 = time.perf_counter()
        _, stats = generate_local(ctx, progress=False)
        seconds = time.perf_counter() - t0
        timing = loc / "generation_seconds.json"
        if stats.shards_done:
            timing.write_text(json.dumps({"seconds": seconds, "shards": stats.shards_done}))
        elif timing.exists():
            seconds = json.loads(timing.read_text())["seconds"]
        return loc, seconds

    def _real_dataset(self, cfg: RunConfig, loc: Path) -> Path:
        """The real 'training' images written as one dataset in the shard format."""
        ctx = RunContext.create(cfg)
        storage = ctx.dataset_storage
        if Manifest.exists(storage) and Manifest.load(storage).is_complete():
            return loc
        x, y = self.test
        idx = self.split.train
        write_real_dataset(ctx, x[idx], y[idx], idx)
        return loc

    def _save(self, path: Path, result: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        keys = ("row", "bits", "seed", "top1_all", "top1_heldout")
        print(json.dumps({k: result[k] for k in keys}), flush=True)

    def _base(self, row: Row, bits: tuple[int, int], seed: int) -> dict[str, Any]:
        return {
            "row": row.name,
            "label": row.label,
            "bits": "FP" if row.kind == "fp" else f"W{bits[0]}A{bits[1]}",
            "seed": seed,
            "budget": self.budget,
            "budget_settings": BUDGETS[self.budget],
            "model_settings": list(self.model),
            "row_settings": list(row.settings),
            "machine": machine(),
            "date": date.today().isoformat(),
            "commit": git_commit(),
        }

    def teacher(self) -> torch.nn.Module:
        """The study's teacher (the budget's model with :attr:`model`'s settings)."""
        return RunContext.create(load_run_config(None, [*BUDGETS[self.budget], *self.model])).teacher()

    def _fp(self, row: Row, seed: int) -> dict[str, Any]:
        return {**self._base(row, (32, 32), seed), **self.accuracy(self.teacher())}

    def _ptq_real(self, row: Row, bits: tuple[int, int], seed: int) -> dict[str, Any]:
        """Min/max ranges on 512 real 'training' images, no fine-tuning."""
        t0 = time.perf_counter()
        ctx = RunContext.create(self.config(row, seed, [f"quant.w_bits={bits[0]}", f"quant.a_bits={bits[1]}"]))
        student = build_student(ctx.teacher(), ctx.cfg.quant)
        x = self.test[0][self.split.train[:512]]
        calibrate_ranges(student, [x[s : s + 128] for s in range(0, x.shape[0], 128)])
        return {
            **self._base(row, bits, seed),
            **self.accuracy(student),
            "calibration_images": int(x.shape[0]),
            "seconds": {"total": time.perf_counter() - t0},
        }

    def _datafree(self, row: Row, bits: tuple[int, int], seed: int) -> dict[str, Any]:
        """A student built without any image (the product's path: ``quantize_only``), evaluated."""
        from intraq_core.evaluate import agreement
        from pipeline.stages.train import quantize_only

        loc = self.workdir / self.budget / f"{row.name}-s{seed}" / f"w{bits[0]}a{bits[1]}"
        cfg = self.config(row, seed, [f"storage.url={loc}", f"quant.w_bits={bits[0]}", f"quant.a_bits={bits[1]}"])
        if cfg.needs_synthetic_data():
            raise ValueError(f"row {row.name} is 'datafree' but its config needs synthetic data")
        ctx = RunContext.create(cfg)
        outcome = quantize_only(ctx)
        student, _, _, _ = load_student(ctx.storage.read_bytes(STUDENT_PATH))
        teacher = ctx.teacher().to(self.device)
        probe = agreement(student.to(self.device), teacher, self.probe, device=self.device)
        t0 = time.perf_counter()
        acc = self.accuracy(student)
        return {
            **self._base(row, bits, seed),
            **acc,
            "calibrated_top1_all": acc["top1_all"],
            "calibrated_top1_heldout": acc["top1_heldout"],
            "probe_agreement": probe["agreement"],
            "probe_kl": probe["kl"],
            "images_used": 0,
            "seconds": {"quantize": outcome.seconds_calibrate, "evaluate": time.perf_counter() - t0},
            "device": str(ctx.device),
        }

    @property
    def probe(self) -> torch.Tensor:
        """The shared data-free probe images (generated once per budget)."""
        if "probe" not in self._cache:
            row = Row("probe", "data-free probe set", settings=PROBE_SETTINGS)
            loc, _ = self.dataset(row, PROBE_SEED)
            cfg = self.config(row, PROBE_SEED, [f"storage.url={loc}"])
            storage = RunContext.create(cfg).dataset_storage
            images = [read_shard(storage, e.path).images for e in Manifest.load(storage).shards]
            self._cache["probe"] = torch.from_numpy(np.concatenate(images))
        return self._cache["probe"]

    def _train(self, row: Row, seed: int, bits: tuple[int, int], data: Path, gen_s: float) -> dict[str, Any]:
        """Train every candidate recipe, keep the best by the data-free score, report it."""
        candidates: dict[str, dict[str, Any]] = {}
        for recipe in self.recipes:
            candidates[recipe] = self._train_recipe(row, seed, bits, data, recipe)
        usable = {k: v for k, v in candidates.items() if not v["diverged"]}
        if not usable:
            raise RuntimeError(f"every recipe diverged for {row.name} W{bits[0]}A{bits[1]} seed {seed}")
        chosen = max(usable, key=lambda k: (usable[k]["probe_agreement"], usable[k]["holdout_agreement"]))
        best = candidates[chosen]
        data_ctx = RunContext.create(self.config(row, seed, [f"storage.url={data}"]))
        stats = dataset_statistics(data_ctx, Manifest.load(data_ctx.dataset_storage), self.test, self.split)
        summary = {
            k: {
                "probe_agreement": v["probe_agreement"],
                "holdout_agreement": v["holdout_agreement"],
                "diverged": v["diverged"],
                "top1_all": v.get("top1_all"),
            }
            for k, v in candidates.items()
        }
        return {
            **self._base(row, bits, seed),
            **{k: v for k, v in best.items() if k != "ctx"},
            "recipe": chosen,
            "recipe_settings": RECIPES[chosen],
            # What resolves to the run config (locations aside), in the order applied.
            "run_settings": [
                *self.settings(row, seed, RECIPES[chosen]),
                f"quant.w_bits={bits[0]}",
                f"quant.a_bits={bits[1]}",
            ],
            "recipe_candidates": summary,
            "recipe_rule": "max teacher agreement on the shared probe set, then on the row's held-out synthetic split",
            "dataset": stats,
            "seconds": {**best["seconds"], "generate": gen_s},
        }

    def _train_recipe(
        self,
        row: Row,
        seed: int,
        bits: tuple[int, int],
        data: Path,
        recipe: str,
        settings: list[str] | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Train one recipe (``RECIPES[recipe]``, or explicit ``settings``) on the row's dataset."""
        from intraq_core.distill import DivergenceError
        from intraq_core.evaluate import agreement

        folder = name or f"{row.name}-s{seed}"
        loc = self.workdir / self.budget / folder / f"w{bits[0]}a{bits[1]}-{recipe}"
        extra = [f"storage.url={loc}", f"dataset={data}", f"quant.w_bits={bits[0]}", f"quant.a_bits={bits[1]}"]
        cfg = self.config(row, seed, extra, RECIPES[recipe] if settings is None else settings)
        ctx = RunContext.create(cfg)
        manifest = Manifest.load(ctx.dataset_storage)
        try:
            outcome = train_local(ctx, manifest, progress=False)
        except DivergenceError as exc:
            return {"diverged": True, "error": str(exc), "probe_agreement": -1.0, "holdout_agreement": -1.0}
        calibrated, _, _, _ = load_student(ctx.storage.read_bytes(CALIBRATED_PATH))
        final, _, _, _ = load_student(ctx.storage.read_bytes(STUDENT_PATH))
        teacher = ctx.teacher().to(self.device)
        probe = agreement(final.to(self.device), teacher, self.probe, device=self.device)
        t0 = time.perf_counter()
        acc_final = self.accuracy(final)
        eval_s = time.perf_counter() - t0
        acc_cal = self.accuracy(calibrated)
        return {
            **acc_final,
            "calibrated_top1_all": acc_cal["top1_all"],
            "calibrated_top1_heldout": acc_cal["top1_heldout"],
            "probe_agreement": probe["agreement"],
            "probe_kl": probe["kl"],
            "holdout_agreement": (outcome.agreement_final or {}).get("agreement", 0.0),
            "holdout_agreement_calibrated": outcome.agreement_calibrated,
            "holdout_agreement_final": outcome.agreement_final,
            "selection": outcome.selection,
            "protocol": cfg.quant.protocol,
            "train_history": outcome.history,
            "diverged": any(not np.isfinite(e["loss"]) for e in outcome.history),
            "seconds": {
                "calibrate": outcome.seconds_calibrate,
                "distill": outcome.seconds_distill,
                "evaluate": eval_s,
            },
            "device": str(ctx.device),
        }

    def cells(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Finished cells by (row, bits)."""
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for p in sorted(self.results.glob("*.json")):
            r = json.loads(p.read_text())
            out.setdefault((r["row"], r["bits"]), []).append(r)
        return out


def fmt(values: list[float], digits: int = 2) -> str:
    """'mean ± std' (or the single value); '–' when empty."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def provenance(cells: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    """'Machines: …. Dates: ….' of a set of cells, for the foot of every results table."""
    machines = sorted({r["machine"] for rs in cells.values() for r in rs})
    dates = sorted({r["date"] for rs in cells.values() for r in rs})
    return f"Machines: {'; '.join(machines)}. Dates: {', '.join(dates)}."


def same_run_notes(cells: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Lines naming the cells that are another study's run (``benchmarks/same_runs.py``)."""
    same = sorted(
        f"{r['row']} {r['bits']} seed {r['seed']} = `{r['same_run_as']}`"
        for rs in cells.values()
        for r in rs
        if r.get("same_run_as")
    )
    if not same:
        return []
    return [
        "",
        "Same run as another study's cell (identical resolved run config, commit and machine): "
        + "; ".join(same)
        + ".",
    ]


def dataset_features(
    ctx: RunContext, manifest: Manifest
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[float, float]]]:
    """The teacher features and labels stored in a dataset's shards, and each shard's final MDC hinge."""
    storage = ctx.dataset_storage
    feats, labels, mdc = [], [], []
    for entry in manifest.shards:
        shard = read_shard(storage, entry.path)
        feats.append(shard.features)
        labels.append(shard.labels)
        fl = shard.meta.get("final_losses") or {}
        if "mdc_lower" in fl:
            mdc.append((fl["mdc_lower"], fl["mdc_upper"]))
    return torch.from_numpy(np.concatenate(feats)), torch.from_numpy(np.concatenate(labels)), mdc


def real_features(
    ctx: RunContext, test: tuple[torch.Tensor, torch.Tensor], split: Split, n: int = 2000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher features and labels of the first ``n`` held-out real test images."""
    teacher = ctx.teacher()
    idx = split.heldout[:n]
    with torch.no_grad(), FeatureTap(teacher) as tap:
        teacher(test[0][idx])
        return tap.features, test[1][idx]


def dataset_statistics(
    ctx: RunContext, manifest: Manifest, test: tuple[torch.Tensor, torch.Tensor], split: Split
) -> dict[str, Any]:
    """Diversity of synthetic features vs real held-out test images, and what MDC's hinge did."""
    f, y, mdc = dataset_features(ctx, manifest)
    real, ry = real_features(ctx, test, split)
    return {
        "centre_distance_synthetic": losses.mean_distance_to_class_centre(f, y),
        "centre_distance_real": losses.mean_distance_to_class_centre(real, ry),
        "pairwise_distance_synthetic": losses.mean_intra_class_cosine_distance(f, y),
        "pairwise_distance_real": losses.mean_intra_class_cosine_distance(real, ry),
        "mdc_final_lower": float(np.mean([m[0] for m in mdc])) if mdc else None,
        "mdc_final_upper": float(np.mean([m[1] for m in mdc])) if mdc else None,
    }


def machine() -> str:
    """CPU model, cores, GPU, torch version and threads, for the results tables."""
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


def git_commit(rev: str = "HEAD") -> str:
    """The short hash of ``rev`` in this checkout, ``-dirty`` appended when HEAD's code (the
    packages and the benchmark scripts) has uncommitted changes; "unknown" without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", rev], capture_output=True, text=True, cwd=REPO)
        commit = out.stdout.strip() or "unknown"
        if rev == "HEAD" and commit != "unknown":
            paths = ["intraq_core", "pipeline", "benchmarks/*.py"]
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            if status.stdout.strip():
                commit += "-dirty"
        return commit
    except OSError:
        return "unknown"
