"""Run the accuracy and speed benchmarks on one GPU machine within a fixed time budget.

A priority-ordered queue of benchmark jobs (each one ``python -m benchmarks.<study> …``
process for one row and seed) runs on a pool of concurrent processes sharing the GPU
(ResNet-20 at 32x32 is launch-bound, so several processes keep the GPU busy). No job is
started once the deadline is near; cell results are written as each job finishes, so a
cut-off campaign still returns everything finished. Used for the GPU results in
``benchmarks/results/`` (the card's name is recorded in every cell)::

    python -m benchmarks.gpu_campaign --minutes 7 --parallel 8 --out /tmp/campaign
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.ablation import ROWS as ABLATION_ROWS


def jobs(out: Path, cpu: str = "cpu", full: str = "full") -> list[tuple[str, list[str]]]:
    """(name, argv) in priority order."""
    py = [sys.executable, "-m"]
    res = out / "results"
    work = ["--workdir", str(out / "work")]
    recipes = ["--recipes", "default", "kd_only"]
    q: list[tuple[str, list[str]]] = []

    def ablation(budget: str, row: str, seed: int) -> None:
        q.append(
            (
                f"ablation-{budget}-{row}-s{seed}",
                [
                    *py,
                    "benchmarks.ablation",
                    "--budget",
                    budget,
                    "--rows",
                    row,
                    "--seeds",
                    str(seed),
                    "--results",
                    str(res / f"ablation-{budget}"),
                    *work,
                    *recipes,
                ],
            )
        )

    def study(name: str, budget: str, seed: int) -> None:
        q.append(
            (
                f"study-{name}-{budget}-s{seed}",
                [
                    *py,
                    "benchmarks.studies",
                    name,
                    "--budget",
                    budget,
                    "--seeds",
                    str(seed),
                    "--results-root",
                    str(res),
                    *work,
                    *recipes,
                ],
            )
        )

    # The reference budget for the two key rows first (the longest jobs).
    for row in ("intraq", "bns_ce"):
        ablation(full, row, 0)
    for row in ("fp", "ptq_real", "real_distill"):
        ablation(full, row, 0)
    # The CPU budget: every ablation row, two seeds.
    for seed in (0, 1):
        for row in ABLATION_ROWS:
            ablation(cpu, row, seed)
    study("lor", cpu, 0)
    study("data", cpu, 0)
    # Lower priority: the remaining rows at the reference budget, a third CPU-budget seed.
    for row in ("intraq_adi", "gaussian", "bns_sil", "bns_ce_lor", "bns_ce_mdc"):
        ablation(full, row, 0)
    for row in ABLATION_ROWS:
        ablation(cpu, row, 2)
    seen: set[str] = set()
    return [j for j in q if not (j[0] in seen or seen.add(j[0]))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget for the whole campaign")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-budget", default="cpu", help="budget of the CPU-budget jobs (tiny: a dry run)")
    ap.add_argument("--full-budget", default="full", help="budget of the reference-budget jobs")
    ap.add_argument("--job-margin", type=float, default=45.0, help="seconds before the deadline to stop launching")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.minutes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    # The shared probe sets first (one process per budget), so jobs never race to create them.
    probes = [
        subprocess.Popen(
            [sys.executable, "-c", _PROBE.format(budget=b, work=str(out / "work"))],
            stdout=open(out / "logs" / f"probe-{b}.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env=env,
        )
        for b in sorted({args.cpu_budget, args.full_budget})
    ]
    for p in probes:
        p.wait()
    print(f"probes done ({[p.returncode for p in probes]}) at {time.time() - deadline + 60 * args.minutes:.0f} s")

    queue = jobs(out, args.cpu_budget, args.full_budget)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    done: list[tuple[str, int, float]] = []
    while queue or running:
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                done.append((name, proc.returncode, time.time() - t0))
                print(f"done {name} rc={proc.returncode} {time.time() - t0:.0f}s", flush=True)
                del running[name]
            elif time.time() > deadline:
                proc.kill()
                done.append((name, -9, time.time() - t0))
                print(f"killed {name} at the deadline", flush=True)
                del running[name]
        while queue and len(running) < args.parallel and time.time() < deadline - args.job_margin:
            name, argv = queue.pop(0)
            log = open(out / "logs" / f"{name}.log", "w")  # noqa: SIM115
            running[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), time.time())
        if not running and (not queue or time.time() >= deadline - args.job_margin):
            break
        time.sleep(1.0)
    print(f"finished {len(done)} jobs; not started: {[n for n, _ in queue]}")


_PROBE = """
import torch
from pathlib import Path
from benchmarks.ablation import ROWS
from benchmarks.harness import Bench
torch.set_num_threads(1)
Bench("{budget}", ROWS, Path("{work}"), Path("/tmp/unused"), [0], [(4, 4)]).probe
print("probe ok")
"""


if __name__ == "__main__":
    main()
