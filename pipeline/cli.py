"""``intraq-pipeline``: the command-line interface.

Every command takes ``--config FILE`` (or the name of a shipped config), repeated
``--set key.path=value`` overrides and ``--storage URL`` (the run location). Bad input
prints one line and exits with code 2 (add ``--debug`` for the traceback). Heavy imports
(torch, Ray) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Data-free (zero-shot) quantization of image classifiers with IntraQ synthetic data.",
)

_STATE = {"debug": False}

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="YAML run config (a path, or a shipped name like 'smoke')."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set generate.iterations=200."),
]
StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", "--output", "-o", help="Run location: a local dir, file://, s3://bucket/prefix."),
]
ClusterOpt = Annotated[
    str | None, typer.Option("--cluster", help="Ray cluster-launcher YAML to run on (default: a local Ray).")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run at this location.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the run at this location.")]
RepairOpt = Annotated[
    bool,
    typer.Option(
        "--repair",
        help="Continue the run and regenerate only the synthetic shards that fail validation "
        "(truncated, wrong schema or shape, NaN/Inf, checksum mismatch).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


class UsageError(ValueError):
    """Bad command-line input."""


def _fail(exc: BaseException, message: str) -> None:
    if _STATE["debug"]:
        raise exc
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _guard(fn):
    """Bad input or environment → ``error: <one line>`` and exit code 2 (``--debug``: the traceback).

    Which failures count, and how Ray-wrapped ones are unwrapped: :mod:`pipeline.errors`.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None
        except Exception as exc:
            from pipeline.errors import explain

            message = explain(exc)
            if message is None:
                raise
            _fail(exc, message)

    return wrapper


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="Logging level.")] = "WARNING",
) -> None:
    _STATE["debug"] = debug
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


def _load_config(config: str | None, sets: list[str] | None, storage: str | None, cluster: str | None):
    from pipeline.config import load_run_config

    overrides = list(sets or [])
    if storage is not None:
        overrides.append(f"storage.url={storage}")
    cfg = load_run_config(config, overrides)
    if cluster is not None:
        from pipeline.cluster import load_cluster_config

        load_cluster_config(cluster)  # validates; connection happens in the stage
    return cfg


@app.command()
@_guard
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    cluster: ClusterOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    repair: RepairOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate synthetic data, quantize, distil and evaluate; writes metrics.json."""
    cfg = _load_config(config, set_, storage, cluster)
    metrics = _run_stage("run", cfg, cluster, resume=resume, overwrite=overwrite, repair=repair, quiet=quiet)
    _print_metrics(metrics, cfg.storage.url)


def _run_stage(stage: str, cfg: Any, cluster: str | None, *, resume: bool, overwrite: bool, repair: bool, quiet: bool):
    """Open the run (every check: bad input fails here, before Ray starts and before the location
    is touched), then execute it inside a Ray session when its executor needs one."""
    from pipeline.run import open_run

    run = open_run(cfg, stage, resume=resume, overwrite=overwrite, repair=repair)
    with _ray_session(cfg, cluster, run.executor.needs_ray):
        return run.execute(progress=not quiet)


def _print_metrics(metrics: dict[str, Any], where: str) -> None:
    typer.echo(
        f"FP top-1 {metrics['fp_top1']:.2f}% | {metrics['method']} W{metrics['w_bits']}A{metrics['a_bits']}: "
        f"calibrated {metrics['ptq_top1']:.2f}% → distilled {metrics['quant_top1']:.2f}%"
    )
    typer.echo(f"metrics: {where.rstrip('/')}/metrics.json")


@contextlib.contextmanager
def _ray_session(cfg: Any, cluster: str | None, needed: bool = True) -> Iterator[None]:
    """The command's Ray session (:func:`pipeline.ray_session.ray_session`), when ``needed``."""
    if not needed:
        yield
        return
    from pipeline.ray_session import ray_session

    with ray_session(cfg, cluster) as info:
        if info.get("dashboard_url"):
            typer.echo(f"Ray dashboard: {info['dashboard_url']}", err=True)
        yield


@app.command()
@_guard
def generate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    cluster: ClusterOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    repair: RepairOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate the synthetic dataset only (Parquet shards + manifest)."""
    cfg = _load_config(config, set_, storage, cluster)
    manifest = _run_stage("generate", cfg, cluster, resume=resume, overwrite=overwrite, repair=repair, quiet=quiet)
    typer.echo(f"{len(manifest.shards)} shards, {manifest.rows} images at {cfg.storage.url.rstrip('/')}/data")


@app.command()
@_guard
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    cluster: ClusterOpt = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Run location whose synthetic data to train on.")
    ] = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    repair: RepairOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Quantize, calibrate and distil on an existing synthetic dataset, then evaluate."""
    cfg = _load_config(config, set_, storage, cluster)
    if dataset is not None:
        cfg = cfg.model_copy(update={"dataset": dataset})
    metrics = _run_stage("train", cfg, cluster, resume=resume, overwrite=overwrite, repair=repair, quiet=quiet)
    _print_metrics(metrics, cfg.storage.url)


@app.command("tune")
@_guard
def tune_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    storage: Annotated[
        str | None,
        typer.Option("--storage", help="Where trials and results go: a local dir, file://, s3://…"),
    ] = None,
    cluster: ClusterOpt = None,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Also write the best config (YAML for `run --config`) here."),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Search tune.space with Ray Tune (ASHA + Optuna) on a data-free objective; print the best config."""
    cfg = _load_config(config, set_, storage, cluster)
    from pipeline.tune import BEST_PATH, tune_search, write_best_config

    with _ray_session(cfg, cluster):
        best, table = tune_search(cfg, progress=not quiet)
    finished = sum(1 for row in table if row["status"] != "error")
    top = table[0]
    typer.echo(
        f"{finished}/{len(table)} trials ran; best {top['objective']:.2f} ({cfg.tune.objective}) "
        f"over {top['epochs']} epochs"
    )
    for key in cfg.tune.space:
        typer.echo(f"  {key}: {top.get(key)}")
    typer.echo(f"best config: {cfg.storage.url.rstrip('/')}/{BEST_PATH}")
    if output is not None:
        typer.echo(f"best config: {write_best_config(best, output)}")


def _parse_bits(bits: str) -> tuple[int, int]:
    import re

    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", bits.strip())
    if not m:
        raise UsageError(f"--bits must look like W4A4, got '{bits}'")
    return int(m.group(1)), int(m.group(2))


@app.command()
@_guard
def evaluate(
    arch: Annotated[str, typer.Option("--arch", help="Architecture (cifar_resnet20, torchvision:resnet18, …).")] = (
        "cifar_resnet20"
    ),
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Checkpoint path or asset name; a student.pt evaluates as is."),
    ] = None,
    data: Annotated[str, typer.Option("--data", help="Test set: asset name, .npz, ImageFolder dir.")] = (
        "cifar10-test"
    ),
    bits: Annotated[
        str | None, typer.Option("--bits", help="Quantize (PTQ, min/max) before evaluating, e.g. W4A4.")
    ] = None,
    calib: Annotated[
        str | None, typer.Option("--calib", help="Data to calibrate activation ranges for --bits.")
    ] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", help="Images used for calibration.")] = 512,
    mean: Annotated[str | None, typer.Option("--mean", help="Input mean, e.g. 0.485,0.456,0.406.")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Input std, e.g. 0.229,0.224,0.225.")] = None,
    num_classes: Annotated[int | None, typer.Option("--num-classes")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 500,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"top1": …, "n": …}.')] = False,
    quiet: QuietOpt = False,
) -> None:
    """Top-1 accuracy of a model (optionally quantized) on a real labelled test set."""
    from pipeline.evaluate import evaluate_command

    result = evaluate_command(
        arch=arch,
        weights=weights,
        data=data,
        bits=_parse_bits(bits) if bits else None,
        calib=calib,
        calib_images=calib_images,
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        num_classes=num_classes,
        batch_size=batch_size,
        progress=not quiet and not as_json,
    )
    if as_json:
        typer.echo(json.dumps({"top1": round(result["top1"], 4), "n": result["n"]}))
    else:
        typer.echo(f"top-1 {result['top1']:.2f}% on {result['n']} images")


def _floats(text: str | None, name: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{name} expects three comma-separated numbers, got '{text}'") from None
    if len(vals) != 3:
        raise UsageError(f"{name} expects three comma-separated numbers, got '{text}'")
    return vals  # type: ignore[return-value]


@app.command()
@_guard
def report(
    run_dir: Annotated[str, typer.Argument(help="Run location (path, file://, s3://).")],
    compare: Annotated[
        list[str] | None,
        typer.Option("--compare", help="Another run to show side by side (repeatable), e.g. an ADI run."),
    ] = None,
    real_data: Annotated[
        str | None,
        typer.Option("--real-data", help="Real test set for the feature statistics (default: the run's)."),
    ] = None,
    real_images: Annotated[
        int, typer.Option("--real-images", help="Real test images used (the first N; 0: none).")
    ] = 2000,
    tsne: Annotated[bool, typer.Option("--tsne/--no-tsne", help="Add t-SNE projections (slower).")] = True,
) -> None:
    """Write RUN_DIR/report/: self-contained report.html, report.md and the PNG plots."""
    if real_images < 0:
        raise UsageError("--real-images must be >= 0")
    from pipeline.report import build_report

    result = build_report(run_dir, compare or [], real_data=real_data, real_images=real_images, tsne=tsne)
    typer.echo(f"report: {result.html_url}")


@app.command()
@_guard
def export(
    run_dir: Annotated[str, typer.Argument(help="Run location (path, file://, s3://) holding student.pt.")],
    format_: Annotated[
        str, typer.Option("--format", "-f", help="onnx (Q/DQ), torchscript or torch-export (.pt2).")
    ] = "onnx",
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="File path or URL (default: RUN_DIR/export/student.<ext>)."),
    ] = None,
    stage: Annotated[
        str, typer.Option("--stage", help="final (student.pt) or calibrated (student_calibrated.pt).")
    ] = "final",
    verify_images: Annotated[
        int,
        typer.Option("--verify-images", help="Real test images to compare export and PyTorch on (0: skip)."),
    ] = 1000,
    data: Annotated[
        str | None, typer.Option("--data", help="Test set for the verification (default: the run's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Export the quantized student (ONNX with QuantizeLinear/DequantizeLinear, TorchScript, .pt2)."""
    if verify_images < 0:
        raise UsageError("--verify-images must be >= 0")
    from pipeline.export import export_run

    result = export_run(run_dir, format_, output, stage=stage, verify_images=verify_images, data=data)
    summary = result.summary()
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"{result.format}: {result.url} ({result.bytes} bytes)")
    if result.sites:
        typer.echo(
            f"Q/DQ sites: {summary['weight_sites']} weight (per channel), "
            f"{summary['activation_sites']} activation (per tensor)"
        )
    v = result.verification
    if v is not None:
        typer.echo(
            f"vs PyTorch on {v['images']} images of {v['test_set']}: "
            f"top-1 agreement {v['agreement']:.2f}%, max |logit diff| {v['max_abs_diff']:.3g}, "
            f"top-1 {v['reference_top1']:.2f}% → {v['export_top1']:.2f}%"
        )


@app.command("show-config")
@_guard
def show_config(config: ConfigOpt = None, set_: SetOpt = None, storage: StorageOpt = None) -> None:
    """Print the fully resolved run config as YAML (defaults + file + overrides)."""
    cfg = _load_config(config, set_, storage, None)
    typer.echo(cfg.to_yaml(), nl=False)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit:
        raise
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    main()

__all__ = ["Path", "app", "main"]
