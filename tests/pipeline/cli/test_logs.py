"""The quiet terminal: what the console shows, what the run's log file keeps, and the summary lines."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli import logs
from pipeline.cli.summary import summary_lines
from pipeline.storage.location import StorageConfig


@pytest.fixture()
def console(capsys: pytest.CaptureFixture[str]):
    """The CLI's console set-up, with Ray's logger routed as the CLI does before starting Ray."""
    root = logging.getLogger()
    level = root.level
    logs.quiet_ray_loggers()
    logs.configure_console("WARNING", verbose=False)
    yield capsys
    root.removeHandler(logs._state["console"])
    logs._state.update(console=None, verbose=False)
    logging.captureWarnings(False)
    root.setLevel(level)


def test_console_shows_our_warnings_and_errors_only(console, tmp_path: Path) -> None:
    with logs.RunLog(StorageConfig(url=str(tmp_path / "run")), "run") as run_log:
        logging.getLogger("pipeline.stages.generate").warning("regenerating 1 bad shard")
        logging.getLogger("pipeline.stages.generate").info("generating 2 shards")
        logging.getLogger("ray._private.worker").info("Started a local Ray instance")
        logging.getLogger("ray._private.utils").warning("ray internals")
        logging.getLogger("ray.workers").info("(RayTrainWorker pid=1) TrainingReport(metrics={})")
        logging.getLogger("somelib").error("a library error")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("`x` is deprecated", DeprecationWarning, stacklevel=1)
        run_log.keep()
    err = console.readouterr().err
    assert "regenerating 1 bad shard" in err and "a library error" in err
    for hidden in ("generating 2 shards", "Started a local Ray", "ray internals", "TrainingReport", "deprecated"):
        assert hidden not in err, hidden
    assert run_log.url is not None
    kept = Path(run_log.url).read_text()
    for text in (
        "regenerating 1 bad shard",
        "generating 2 shards",
        "Started a local Ray",
        "TrainingReport",
        "deprecated",
    ):
        assert text in kept, text
    assert Path(run_log.url).parent == tmp_path / "run" / "logs"


def test_verbose_shows_everything(console) -> None:
    logs.configure_console("WARNING", verbose=True)
    logging.getLogger("ray._private.worker").info("Started a local Ray instance")
    logging.getLogger("somelib").info("library detail")
    err = console.readouterr().err
    assert "Started a local Ray instance" in err and "library detail" in err


def test_a_refused_run_leaves_no_log_even_after_its_checks(tmp_path: Path) -> None:
    from pipeline.errors import LockedError

    url = tmp_path / "run"
    with pytest.raises(LockedError), logs.RunLog(StorageConfig(url=str(url)), "run", refusals=(LockedError,)) as log:
        log.keep()
        raise LockedError("locked by another run")
    assert not url.exists()
    with pytest.raises(RuntimeError), logs.RunLog(StorageConfig(url=str(url)), "run", refusals=(LockedError,)) as log:
        log.keep()
        raise RuntimeError("the run failed while working")  # the log is what explains it: kept
    assert [p.name.startswith("run-") for p in (url / "logs").iterdir()] == [True]


def test_a_refused_command_leaves_no_log_in_the_location(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad input"), logs.RunLog(StorageConfig(url=str(tmp_path / "run")), "run"):
        logging.getLogger("pipeline.run.job").warning("checking")
        raise ValueError("bad input")  # before keep(): the checks failed
    assert not (tmp_path / "run").exists()


def test_worker_lines_are_prefixed_and_autoscaler_status_dropped() -> None:
    batch = {"pid": 42, "actor_name": "RayTrainWorker", "lines": ["a", "b"]}
    assert list(logs._worker_lines(batch)) == ["(RayTrainWorker pid=42) a", "(RayTrainWorker pid=42) b"]
    status = {"pid": "autoscaler", "lines": ["======== Autoscaler status ========", "Node status"]}
    assert list(logs._worker_lines(status)) == []


@pytest.fixture()
def worker_log(tmp_path: Path) -> Iterator[Path]:
    """The file that the workers' logger (``ray.workers``, at INFO) writes to; routing undone afterwards."""
    log = logging.getLogger(logs.WORKER_LOGGER)
    path = tmp_path / "run.log"
    handler = logging.FileHandler(path)
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        yield path
    finally:
        logs.stop_routing_worker_output()
        log.removeHandler(handler)
        handler.close()
        log.setLevel(level)


def test_raylet_warnings_go_to_the_log_not_the_terminal(capsys: pytest.CaptureFixture[str], worker_log: Path) -> None:
    """The raylet's message to the driver (as Ray's error listener sends it) lands in the log
    file, not on the terminal, while the output is routed; afterwards Ray prints it again."""
    from ray._private import worker

    message = {"lines": ["WARNING: 8 PYTHON worker processes have been started"], "pid": "raylet", "is_err": False}
    assert logs.route_worker_output(verbose=False)
    worker.print_to_stdstream(message, ignore_prefix=False)  # the listener's call, looked up at call time
    logs.stop_routing_worker_output()
    assert capsys.readouterr().out == ""
    assert "(pid=raylet) WARNING: 8 PYTHON worker processes" in worker_log.read_text()
    worker.print_to_stdstream(message, ignore_prefix=False)
    assert "8 PYTHON worker processes" in capsys.readouterr().out


def test_workers_bars_are_drawn_on_the_terminal_and_kept_out_of_the_log(
    monkeypatch: pytest.MonkeyPatch, worker_log: Path
) -> None:
    """A worker's ``tqdm_ray`` bar state (one line of its output) goes to the driver's bar manager,
    not into the log file; its other lines go to the log. With ``--verbose`` Ray's own printer
    draws the bars, so the routed output only keeps them out of the log."""
    import json

    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    from ray.experimental import tqdm_ray

    drawn: list[dict] = []
    monkeypatch.setattr(tqdm_ray, "instance", lambda: type("Manager", (), {"process_state_update": drawn.append})())
    state = {"__magic_token__": tqdm_ray.RAY_TQDM_MAGIC, "x": 3, "total": 10, "desc": "intraq-generator-0", "uuid": "u"}
    batch = {"pid": 42, "actor_name": "GeneratorActor", "lines": ["shard 2 written", json.dumps(state)]}
    for verbose, want in ((False, [state]), (True, [])):
        drawn.clear()
        assert logs.route_worker_output(verbose=verbose)
        dict(dispatcher.handlers)[logs._HANDLER_NAME](batch)  # what Ray's log stream hands the printer
        logs.stop_routing_worker_output()
        assert drawn == want, verbose
    kept = worker_log.read_text()
    assert kept.count("(GeneratorActor pid=42) shard 2 written") == 2
    assert tqdm_ray.RAY_TQDM_MAGIC not in kept


def _metrics(ptq: float, final: float, before: float | None, after: float | None) -> dict:
    training = {}
    if before is not None:
        training = {
            "holdout_agreement_calibrated": {"agreement": before},
            "holdout_agreement_final": {"agreement": after},
        }
    return {
        "fp_top1": 91.5,
        "ptq_top1": ptq,
        "quant_top1": final,
        "method": "intraq",
        "w_bits": 4,
        "a_bits": 4,
        "num_images": 64,
        "gen_iterations": 20,
        "epochs": 2,
        "training": training,
    }


def test_summary_says_when_distillation_made_it_worse_and_what_the_signal_said() -> None:
    (line,) = summary_lines(_metrics(83.1, 85.0, 80.0, 90.0))
    assert line == "FP top-1 91.50% | intraq W4A4: calibrated 83.10% → distilled 85.00%"
    _, note = summary_lines(_metrics(83.1, 74.1, 44.4, 22.2))
    assert "9.00 points WORSE than its starting point (calibrated)" in note
    assert "64 synthetic images × 20 iterations, 2 epoch(s)" in note
    assert "the data-free signal saw it: held-out teacher agreement fell 44.4% → 22.2%" in note
    _, missed = summary_lines(_metrics(83.1, 80.0, 40.0, 60.0))
    assert "did not: held-out teacher agreement went 40.0% → 60.0%" in missed
    _, none = summary_lines(_metrics(83.1, 80.0, None, None))
    assert "no held-out synthetic images" in none


def test_summary_names_the_most_costly_activation_tensors_when_the_run_ranked_them() -> None:
    metrics = _metrics(83.1, 85.0, 80.0, 90.0)
    assert not any("activation tensors" in line for line in summary_lines(metrics))
    metrics["training"]["activation_sensitivity"] = [
        {"name": "act_quant.stem", "bits": 4, "kl": 0.387, "agreement": 61.0},
        {"name": "act_quant.pw1", "bits": 4, "kl": 0.249, "agreement": 70.4},
        {"name": "act_quant.b", "bits": 4, "kl": 0.02, "agreement": 96.0},
        {"name": "act_quant.c", "bits": 4, "kl": 0.01, "agreement": 98.0},
    ]
    (line,) = [line for line in summary_lines(metrics) if "activation tensors" in line]
    assert line == (
        "most costly activation tensors alone: act_quant.stem (A4): KL 0.387, agreement 61%; act_quant.pw1 (A4): "
        "KL 0.249, agreement 70%; act_quant.b (A4): KL 0.020, agreement 96%; median KL 0.135 over 4 tensors "
        "(the first is 3x the median)"
    )
