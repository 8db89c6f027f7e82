"""Diagnosis only: a run's recipe calibrated on REAL images, to tell the data's share of a loss
from the quantization recipe's (``benchmarks/results/imagenet-mobilenetv1-cpu.md``).

``write`` puts the even-indexed half of a config's test set into a dataset in the shard format
(the teacher's features included, like a generated one), so ``intraq-pipeline train --dataset``
runs the config's train stage on it unchanged. ``eval`` scores students on both halves. Real
images choose nothing here: the result is an upper bound for the data, never a recipe::

    python -m benchmarks.real_split write -c configs/imagenet_mobilenetv1_025_w4a4_cpu.yaml -o real-even
    intraq-pipeline train -c configs/imagenet_mobilenetv1_025_w4a4_cpu.yaml --dataset real-even -o w4a4-real
    python -m benchmarks.real_split eval -c configs/imagenet_mobilenetv1_025_w4a4_cpu.yaml w4a4-real/student.pt

``ptq`` runs only the config's quantization step (ranges, then block reconstruction for ``quant.method:
reconstruct``) on the even half and scores the odd half, with ``--set`` overrides: a quick way to
compare quantization recipes without synthesis or distillation::

    python -m benchmarks.real_split ptq -c configs/imagenet_mobilenetv1_025_w4a4_cpu.yaml --set quant.a_bits=8
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import numpy as np
import torch

import intraq_core as iq
from benchmarks.harness import write_real_dataset
from intraq_core.data import load_test_set
from intraq_core.evaluate import top1
from intraq_core.quant.methods import CalibrationInputs, calibration_positions, run_calibration
from intraq_core.student import load_student
from pipeline.config import load_run_config
from pipeline.context import RunContext


def _test_images(ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    test_set = load_test_set(ctx.cfg.eval, ctx.model_cfg)
    xs, ys = zip(*test_set.batches(ctx.cfg.eval.batch_size), strict=True)
    return torch.cat(xs), torch.cat(ys)


def write(config: str, out: str) -> None:
    """The even half of the config's test set as a one-shard dataset at ``out``."""
    cfg = load_run_config(config, [f"storage.url={out}"])
    ctx = RunContext.create(cfg)
    x, y = _test_images(ctx)
    even = np.arange(0, len(y), 2)
    write_real_dataset(ctx, x[even], y[even], even, store_dtype="float16")
    print(f"wrote {len(even)} real images (the even half) to {out}")


def evaluate(config: str, students: list[str]) -> None:
    """Top-1 of each student on the odd half (never calibrated on) and the even half."""
    ctx = RunContext.create(load_run_config(config, []))
    x, y = _test_images(ctx)
    halves = {"odd": np.arange(1, len(y), 2), "even": np.arange(0, len(y), 2)}

    def batches(idx: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(idx), 100):
            yield x[idx[i : i + 100]], y[idx[i : i + 100]]

    for path in students:
        student = load_student(path)[0].eval()
        scores = {name: top1(student, batches(idx)) for name, idx in halves.items()}
        print(json.dumps({"student": path, **scores}), flush=True)


def ptq(config: str, overrides: list[str], batch_size: int = 64) -> dict:
    """The config's quantization step (no synthesis, no distillation) on the even half; top-1 on the odd half.

    Range calibration reads ``quant.calibration_batches`` seeded batches of ``batch_size`` even-half
    images; reconstruction fits on the first ``quant.reconstruct.num_images`` of them.
    """
    cfg = load_run_config(config, overrides)
    ctx = RunContext.create(cfg)
    x, y = _test_images(ctx)
    even, odd = x[0::2], (x[1::2], y[1::2])
    teacher = iq.create_model(ctx.model_cfg).eval()
    start = time.perf_counter()
    student = iq.quantize(teacher, cfg.quant)
    idx = calibration_positions(even.shape[0], cfg.quant.calibration_batches, batch_size, cfg.seed)
    report = run_calibration(student, cfg.quant, CalibrationInputs([even[i] for i in idx], teacher, even, cfg.seed))
    seconds = time.perf_counter() - start
    batches = ((odd[0][i : i + 100], odd[1][i : i + 100]) for i in range(0, len(odd[1]), 100))
    units = report.get("reconstruct", {}).get("units", [])
    return {
        "set": overrides,
        "odd_top1": top1(student.eval(), batches)["top1"],
        "seconds": round(seconds, 1),
        "units": [(u["unit"], round(u["mse_before"], 4), round(u["mse_after"], 4)) for u in units],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="the even half of the test set as a dataset")
    w.add_argument("-c", "--config", required=True)
    w.add_argument("-o", "--out", required=True)
    e = sub.add_parser("eval", help="students on both halves")
    e.add_argument("-c", "--config", required=True)
    e.add_argument("students", nargs="+")
    q = sub.add_parser("ptq", help="the quantization step alone on the even half, scored on the odd half")
    q.add_argument("-c", "--config", required=True)
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.command == "write":
        write(args.config, args.out)
    elif args.command == "ptq":
        print(json.dumps(ptq(args.config, args.overrides)), flush=True)
    else:
        evaluate(args.config, args.students)


if __name__ == "__main__":
    main()
