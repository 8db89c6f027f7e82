"""A results table built from the ``metrics.json`` of finished runs (never typed by hand).

Each row is one run location (local path or URL the CLI wrote): its synthetic data (images ×
iterations, images per class when the dataset's manifest is readable), FP, calibrated (the start
of distillation: reconstruction PTQ) and kept top-1, the drop from FP, the data-free signal
(teacher agreement on the held-out synthetic images, at the start and for the kept model), the
protocol and the quantization map in numbers, and the seconds of each stage. The generation seconds come from the
dataset's own run (``--dataset-run``), since ``train --dataset`` reuses a dataset generated once.

Example::

    python -m benchmarks.runs_table --title "ImageNet MobileNetV1 x0.25, CPU budget" \\
        --dataset-run /work/inet/data-s0 W4A4=/work/inet/w4a4-s0 W8A8=/work/inet/w8a8-s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _load(location: str) -> dict[str, Any]:
    return json.loads((Path(location) / "metrics.json").read_text())


def _map_cell(q: dict[str, Any]) -> str:
    w, a = q["weight_layers"], q["activations"]
    wb = ", ".join(f"{n}×{b}b" for b, n in w["bits"].items())
    ab = ", ".join(f"{n}×{b}b" for b, n in a["bits"].items())
    image = "image quantized" if a.get("image") else "image float"
    per_channel = f", {a['per_channel']} per channel at depthwise inputs" if a.get("per_channel") else ""
    return f"weights {wb} ({len(w['float'])} float); acts {ab} ({a['unsigned']} unsigned{per_channel}); {image}"


def _data_cell(m: dict[str, Any]) -> str:
    """``512 × 120 (0.51/class)``: the run's synthetic images, iterations and images per class."""
    n, iterations = m.get("num_images"), m.get("gen_iterations")
    if not n:
        return "none"
    cell = f"{n} × {iterations}" if iterations else f"{n} (not optimized)"
    manifest = Path(str(m.get("dataset", ""))) / "manifest.json"
    if manifest.is_file():
        classes = json.loads(manifest.read_text()).get("num_classes")
        if classes:
            cell += f" ({n / classes:.2g}/class)"
    return cell


def _agreement_cell(m: dict[str, Any]) -> str:
    """Teacher agreement on the held-out synthetic images: at the start → for the kept model."""
    training = m.get("training") or {}
    start = (training.get("holdout_agreement_calibrated") or {}).get("agreement")
    kept = (training.get("holdout_agreement_final") or {}).get("agreement")
    if start is None or kept is None:
        return "–"
    return f"{start:.1f} → {kept:.1f} ({training.get('num_holdout_images', '?')} images)"


def table(rows: list[tuple[str, dict[str, Any]]], generate_s: float | None) -> str:
    lines = [
        "| run | data | protocol | FP | start (reconstructed) | kept | drop from FP | kept epoch | "
        "held-out agreement, start → kept | quantization map | reconstruct + calibrate s | distill s | evaluate s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for label, m in rows:
        q = m.get("quantization") or {}
        training = m.get("training") or {}
        if m.get("epochs") == 0:
            kept = "– (no distillation)"
        elif training.get("kept_final") is False:
            epoch = training.get("selected_epoch")
            kept = "start" if epoch is None else f"epoch {epoch + 1}"
        else:
            kept = "final"
        s = m["seconds"]
        lines.append(
            f"| {label} | {_data_cell(m)} | {q.get('protocol', '?')} | {m['fp_top1']:.2f} | {m['ptq_top1']:.2f} | "
            f"{m['quant_top1']:.2f} | "
            f"{m['fp_top1'] - m['quant_top1']:.2f} | {kept} | {_agreement_cell(m)} | {_map_cell(q) if q else '?'} | "
            f"{s.get('calibrate', 0):.0f} | {s.get('distill', 0):.0f} | {s.get('evaluate', 0):.0f} |"
        )
    if generate_s is not None:
        lines += ["", f"Generation (shared by every row): {generate_s:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=LOCATION of finished runs")
    ap.add_argument("--dataset-run", default=None, help="location of the generate run (its seconds)")
    ap.add_argument("--title", default="Runs")
    args = ap.parse_args()
    rows = []
    for item in args.runs:
        label, _, location = item.partition("=")
        rows.append((label, _load(location)))
    generate_s = None
    if args.dataset_run is not None:
        path = Path(args.dataset_run) / "metrics.json"
        if path.is_file():
            generate_s = json.loads(path.read_text()).get("seconds", {}).get("generate")
    print(f"# {args.title}\n")
    print(table(rows, generate_s))


if __name__ == "__main__":
    main()
