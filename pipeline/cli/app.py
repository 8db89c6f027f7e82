"""``intraq-pipeline``: the command-line interface.

Every command takes ``--config FILE`` (or the name of a shipped config), repeated
``--set key.path=value`` overrides and ``--storage URL`` (the run location). The model options
are the same everywhere: ``--arch``/``--weights`` are shortcuts for ``--set model.arch=…`` /
``--set model.weights=…`` and every ``model.*`` key can be set (``--set model.mean=…``). Bad
input prints one line and exits with code 2 (add ``--debug`` for the traceback). The terminal
shows progress bars, the dashboard URL and results; Ray's and the workers' output goes to the
run's log file (``--verbose`` shows it, see :mod:`pipeline.cli.logs`). Heavy imports (torch, Ray)
happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli.options import (
    ArchOpt,
    ClusterOpt,
    ConfigOpt,
    QuietOpt,
    RunOptions,
    SetOpt,
    StorageOpt,
    WeightsOpt,
    check_calib_images,
    load_config,
    parse_bits,
    parse_floats,
    run_options,
    yaml_string,
)
from pipeline.cli.summary import summary_lines
from pipeline.errors import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Data-free (zero-shot) quantization of image classifiers with IntraQ synthetic data.",
)

_STATE = {"debug": False, "verbose": False}


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
            from pipeline.cli.explain import explain

            message = explain(exc)
            if message is None:
                raise
            _fail(exc, message)

    return wrapper


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="Level of the project's own log lines.")] = "WARNING",
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Also show Ray's log lines, warnings and the workers' output."),
    ] = False,
) -> None:
    from pipeline.cli.logs import configure_console

    _STATE["debug"] = debug
    _STATE["verbose"] = verbose
    configure_console(log_level, verbose=verbose)


@app.command()
@_guard
@run_options
def run(opts: RunOptions) -> None:
    """Generate synthetic data, quantize, distil and evaluate; writes metrics.json."""
    cfg = opts.load()
    metrics, log_url = _run_stage("run", cfg, opts)
    _print_metrics(metrics, cfg.storage.url, log_url)


def _run_stage(stage: str, cfg: Any, opts: RunOptions) -> tuple[Any, str | None]:
    """Open the run (every check: bad input fails here, before Ray starts and before the location
    is touched), then execute it inside a Ray session when its executor needs one.

    The log records the checks too, but reaches the location only once the run starts executing:
    a refused input, or a Ray that cannot start, leaves no ``logs/`` (nor anything else) there.
    """
    from pipeline.cli.logs import RunLog
    from pipeline.errors import LockedError, RunExistsError
    from pipeline.run.job import open_run

    with RunLog(cfg.storage, stage, refusals=(RunExistsError, LockedError)) as log:
        run = open_run(
            cfg, stage, resume=opts.resume, overwrite=opts.overwrite, repair=opts.repair, cluster=opts.cluster
        )
        # A run that needs no images (SQuant without distillation) has no work for Ray.
        needs_ray = run.executor.needs_ray and (stage != "run" or cfg.needs_synthetic_data())
        with _ray_session(cfg, opts.cluster, needs_ray):
            log.keep()
            result = run.execute(progress=not opts.quiet)
    return result, log.url


def _print_metrics(metrics: dict[str, Any], where: str, log_url: str | None = None) -> None:
    for line in summary_lines(metrics):
        typer.echo(line)
    typer.echo(f"metrics: {where.rstrip('/')}/metrics.json")
    if log_url:
        typer.echo(f"log: {log_url}")


@contextlib.contextmanager
def _ray_session(cfg: Any, cluster: str | None, needed: bool = True) -> Iterator[None]:
    """The command's Ray session (:func:`pipeline.ray.session.ray_session`), when ``needed``.

    Ray's own log lines and the workers' output are routed to the command's log (see
    :mod:`pipeline.cli.logs`) unless ``--verbose``.
    """
    if not needed:
        yield
        return
    from pipeline.cli.logs import quiet_ray_loggers, route_worker_output, stop_routing_worker_output
    from pipeline.ray.session import ray_session

    verbose = bool(_STATE["verbose"])
    if not verbose:
        quiet_ray_loggers()
    with ray_session(cfg, cluster) as info:
        route_worker_output(verbose=verbose)
        try:
            if info.get("dashboard_url"):
                typer.echo(f"Ray dashboard: {info['dashboard_url']}", err=True)
            yield
        finally:
            stop_routing_worker_output()


@app.command()
@_guard
@run_options
def generate(opts: RunOptions) -> None:
    """Generate the synthetic dataset only (Parquet shards + manifest)."""
    cfg = opts.load()
    manifest, log_url = _run_stage("generate", cfg, opts)
    typer.echo(f"{len(manifest.shards)} shards, {manifest.rows} images at {cfg.storage.url.rstrip('/')}/data")
    if log_url:
        typer.echo(f"log: {log_url}")


@app.command()
@_guard
@run_options
def train(
    opts: RunOptions,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Run location whose synthetic data to train on.")
    ] = None,
) -> None:
    """Quantize, calibrate and distil on an existing synthetic dataset, then evaluate."""
    cfg = opts.load()
    if dataset is not None:
        cfg = cfg.model_copy(update={"dataset": dataset})
    metrics, log_url = _run_stage("train", cfg, opts)
    _print_metrics(metrics, cfg.storage.url, log_url)


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
    arch: ArchOpt = None,
    weights: WeightsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Search tune.space with Ray Tune (ASHA + Optuna) on a data-free objective; print the best config."""
    cfg = load_config(config, set_, storage, cluster, arch=arch, weights=weights)
    from pipeline.cli.logs import RunLog
    from pipeline.ray.tune import BEST_PATH, tune_search, write_best_config
    from pipeline.ray.tune_space import check_tune

    check_tune(cfg)  # before the log file and Ray: one line, nothing written

    with RunLog(cfg.storage, "tune") as log, _ray_session(cfg, cluster):
        log.keep()
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
    if log.url:
        typer.echo(f"log: {log.url}")


@app.command()
@_guard
def evaluate(
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", help="Take the model and test set from this run config (a path or name)."),
    ] = None,
    set_: SetOpt = None,
    arch: ArchOpt = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="Checkpoint path, asset name or torchvision:/timm:<TAG> (= --set model.weights=…); "
            "a student.pt evaluates as is.",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Test set (= --set eval.data=…): asset name, .npz, ImageFolder dir, or a flat folder of images "
            "with --labels.",
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="The model's class list in output order (= --set eval.classes=…): imagenet1k or a file, one class "
            "id (e.g. a wnid) first on each line; labels the folders of a subset of the classes.",
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="Ground truth of a flat folder of images (= --set eval.labels=…): '<file name> <class index or id>' "
            "lines, the official ImageNet validation layout.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="Processes decoding image files (= --set eval.num_workers=…; default min(4, CPUs))."
        ),
    ] = None,
    bits: Annotated[
        str | None, typer.Option("--bits", help="Quantize (PTQ, min/max) before evaluating, e.g. W4A4.")
    ] = None,
    calib: Annotated[
        str | None, typer.Option("--calib", help="Data to calibrate activation ranges for --bits.")
    ] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", help="Images used for calibration.")] = 512,
    mean: Annotated[
        str | None, typer.Option("--mean", help="Input mean (= --set model.mean=…), e.g. 0.485,0.456,0.406.")
    ] = None,
    std: Annotated[
        str | None, typer.Option("--std", help="Input std (= --set model.std=…), e.g. 0.229,0.224,0.225.")
    ] = None,
    num_classes: Annotated[int | None, typer.Option("--num-classes", help="= --set model.num_classes=…")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="= --set eval.batch_size=…")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N test images.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"top1": …, "n": …}.')] = False,
    quiet: QuietOpt = False,
) -> None:
    """Top-1 accuracy of a model (optionally quantized) on a real labelled test set.

    The model is the run config's ``model`` section (``--config``, ``--set model.…``, or the
    shortcuts); without ``--config`` it starts from a randomly initialized ``cifar_resnet20``.
    Image files are resized and centre-cropped as the model spec says (``model.resize`` or
    ``model.crop_pct``, ``model.interpolation``; ImageNet's 256 -> 224 bilinear by default).
    """
    from pipeline.stages.evaluate import evaluate_command

    parsed_bits = parse_bits(bits) if bits else None
    check_calib_images(calib_images)
    shortcuts = []
    for key, value in (("model.mean", parse_floats(mean, "--mean")), ("model.std", parse_floats(std, "--std"))):
        if value is not None:
            shortcuts.append(f"{key}={list(value)}")
    for key, value in (
        ("model.num_classes", num_classes),
        ("eval.batch_size", batch_size),
        ("eval.limit", limit),
        ("eval.num_workers", workers),
    ):
        if value is not None:
            shortcuts.append(f"{key}={value}")
    for key, text in (("eval.data", data), ("eval.classes", classes), ("eval.labels", labels)):
        if text is not None:
            shortcuts.append(f"{key}={yaml_string(text)}")
    base = None if config is not None else {"model": {"weights": None}}
    cfg = load_config(config, [*shortcuts, *(set_ or [])], None, None, arch=arch, weights=weights, base=base)
    result = evaluate_command(
        model_cfg=cfg.model,
        eval_cfg=cfg.eval,
        bits=parsed_bits,
        calib=calib,
        calib_images=calib_images,
        progress=not quiet and not as_json,
    )
    if as_json:
        typer.echo(json.dumps({"top1": round(result["top1"], 4), "n": result["n"]}))
    else:
        typer.echo(f"top-1 {result['top1']:.2f}% on {result['n']} images")
        if "quantization" in result:
            from intraq_core.quant import format_quant_map

            typer.echo(f"quantized: {format_quant_map(result['quantization'], layers=False)}")


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
    from pipeline.report.render import build_report

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
    from pipeline.stages.export import export_run

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


@app.command("show-quant")
@_guard
def show_quant(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    arch: ArchOpt = None,
    weights: WeightsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the map as JSON.")] = False,
) -> None:
    """Print the quantization map of the config's model without running anything.

    Which weight layers are quantized at which bits, what every weight layer reads (which
    activation quantizer, at which bits and sign, or the image), and which layers stay float and
    why. Builds the model and traces it; reads no image and writes nothing.
    """
    from intraq_core.models import create_model, resolve_model_config
    from intraq_core.quant import format_quant_map, quant_map, quantize

    cfg = load_config(config, set_, None, None, arch=arch, weights=weights)
    model_cfg = resolve_model_config(cfg.model)
    teacher = create_model(model_cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the map lists the float layers itself
        qmap = {"protocol": cfg.quant.protocol, **quant_map(quantize(teacher, cfg.quant))}
    if as_json:
        typer.echo(json.dumps(qmap, indent=1))
    else:
        typer.echo(f"{model_cfg.arch}: {qmap['protocol']}")  # the arch the weights named, not the default
        typer.echo(format_quant_map(qmap))


@app.command("show-config")
@_guard
def show_config(config: ConfigOpt = None, set_: SetOpt = None, storage: StorageOpt = None) -> None:
    """Print the fully resolved run config as YAML (defaults + file + overrides)."""
    cfg = load_config(config, set_, storage, None)
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
