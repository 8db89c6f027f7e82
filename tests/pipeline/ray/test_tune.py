"""The Ray Tune search (``pipeline.ray.tune``, ``tune_space``, ``tune_trial``; ``intraq-pipeline tune``).

Unit tests of the search space, the searcher, the probe set, the trials' resources and the
objective's guards run without Ray. One end-to-end search runs through the CLI on the session's
Ray: 4 trials (ASHA + Optuna, 2 at a time, 1 CPU each) with the real teacher and a tiny budget
(32 images x 2 iterations in 2 rounds, 2 epochs of 2 steps); every trial reports during
generation, and the best config it writes must load with ``load_run_config`` and carry the best
trial's values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from intraq_core.evaluate import agreement
from intraq_core.student import load_student
from pipeline.cli.app import app
from pipeline.config import ConfigError, load_run_config
from pipeline.context import RunContext
from pipeline.ray.tune import BEST_PATH, RESULTS_PATH, search_algorithm, trial_resources
from pipeline.ray.tune_space import check_objective, search_space, trial_config
from pipeline.ray.tune_trial import probe_config
from pipeline.storage.manifest import Manifest, read_all
from pipeline.storage.store import Storage

TRIALS = 4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """This process's torch work (generating the probe set) on one thread, like the trials: on a
    busy 2-core box two OpenMP threads made a small training step ~60x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_space_samples_weights_log_uniformly_and_margins_uniformly() -> None:
    from ray.tune.search.sample import Float, Integer, LogUniform, Uniform

    cfg = load_run_config(
        None,
        [
            "tune.space={generate.bns_weight: [0.1, 10], generate.mdc_lower: [0.0, 0.2], "
            "generate.sil_epsilon: [0.5, 1.0], distill.kd_alpha: [0.5, 4], distill.lr: [1e-4, 1e-2], "
            "generate.iterations: [10, 50], distill.kd_temperature: [4, 4]}"
        ],
    )
    space = search_space(cfg)
    for key in ("generate.bns_weight", "distill.kd_alpha", "distill.lr"):
        assert isinstance(space[key], Float) and isinstance(space[key].get_sampler(), LogUniform), key
    for key in ("generate.mdc_lower", "generate.sil_epsilon"):
        assert isinstance(space[key], Float) and isinstance(space[key].get_sampler(), Uniform), key
    assert isinstance(space["generate.iterations"], Integer)
    assert (space["generate.iterations"].lower, space["generate.iterations"].upper) == (10, 51)
    assert space["distill.kd_temperature"] == 4.0  # a fixed value, not a domain


def test_default_space_is_valid() -> None:
    space = search_space(load_run_config(None))
    assert set(space) == set(load_run_config(None).tune.space)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("{generate.bns_wieght: [0.1, 1]}", "did you mean 'generate.bns_weight'"),
        ("{generate.bns_weight: [2, 1]}", "low <= high"),
        ("{generate.bns_weight: [1, 2, 3]}", "low <= high"),
        ("{generate.method: [0, 1]}", "only numeric keys"),
        ("{generate.iterations: [1.5, 9]}", "integer bounds"),
        ("{generate.sil_epsilon: [0.5, 1.5]}", "sil_epsilon"),
        ("{}", "tune.space is empty"),
    ],
)
def test_bad_spaces_are_refused(space: str, message: str) -> None:
    cfg = load_run_config(None, [f"tune.space={space}"])
    with pytest.raises(ConfigError, match=message):
        search_space(cfg)


def test_trial_config_applies_dotted_values_exactly() -> None:
    cfg = trial_config(load_run_config(None), {"generate.bns_weight": 1e-05, "distill.kd_alpha": 2.5})
    assert cfg.generate.bns_weight == 1e-05 and cfg.distill.kd_alpha == 2.5
    with pytest.raises(ConfigError):
        trial_config(load_run_config(None), {"generate.mdc_lower": 0.9, "generate.mdc_upper": 0.1})


@pytest.mark.parametrize("num_samples", [2, 4, 8, 40])
def test_tpe_leaves_its_random_start_up_within_the_search(num_samples: int) -> None:
    alg = search_algorithm(load_run_config(None, [f"tune.num_samples={num_samples}", "seed=3"]))
    sampler = alg._sampler  # the TPESampler handed to OptunaSearch
    assert type(sampler).__name__ == "TPESampler"
    assert 1 <= sampler._n_startup_trials < num_samples


def test_probe_set_does_not_depend_on_the_base_loss_weights(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    base = load_run_config(None, ["generate.num_images=64", "generate.iterations=5"])
    other = load_run_config(
        None,
        [
            "generate.num_images=64",
            "generate.iterations=5",
            "generate.bns_weight=7",
            "generate.sil_weight=0.2",
            "generate.mdc_weight=3",
            "generate.mdc_lower=0.1",
            "generate.lor=false",
            "generate.method=adi",
            "distill.kd_alpha=3",
        ],
    )
    a, b = probe_config(base, storage), probe_config(other, storage)
    assert a.generate == b.generate and a.dataset_hash() == b.dataset_hash()
    assert a.generate.method == "bns_ce" and a.generate.weights() == {
        "bns": 1.0,
        "ce": 1.0,
        "sil": 0.0,
        "mdc": 0.0,
        "adi": 0.0,
    }
    assert (a.generate.num_images, a.generate.iterations) == (64, 5)  # the base budget
    assert a.seed != base.seed  # never the images of a trial of the same seed
    assert probe_config(load_run_config(None, ["seed=1"]), storage).dataset_hash() != a.dataset_hash()


def test_trials_reserve_fractional_gpus_only_with_gpus() -> None:
    gpu = load_run_config(None, ["ray.use_gpu=yes", "tune.gpus_per_trial=0.25"])
    assert trial_resources(gpu) == {"cpu": 1, "gpu": 0.25}
    assert trial_resources(load_run_config(None, ["device=cpu"])) == {"cpu": 1}
    assert trial_resources(load_run_config(None, ["ray.use_gpu=yes", "tune.gpus_per_trial=2"]))["gpu"] == 2
    with pytest.raises(ConfigError, match="gpus_per_trial"):
        load_run_config(None, ["tune.gpus_per_trial=1.5"])


def test_validation_objective_never_uses_the_test_set(cifar10_test_path: Path) -> None:
    check_objective(load_run_config(None))  # data-free agreement: nothing to check
    with pytest.raises(ConfigError, match=r"needs tune\.validation_data"):
        check_objective(load_run_config(None, ["tune.objective=validation"]))
    with pytest.raises(ConfigError, match="is the evaluation test set"):
        check_objective(load_run_config(None, ["tune.objective=validation", "tune.validation_data=cifar10-test"]))
    with pytest.raises(ConfigError, match="is the evaluation test set"):  # same file, other spelling
        check_objective(
            load_run_config(None, ["tune.objective=validation", f"tune.validation_data={cifar10_test_path}"])
        )
    check_objective(load_run_config(None, ["tune.objective=validation", "tune.validation_data=/data/cifar10-val.npz"]))


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_tune_cli_runs_trials_and_writes_a_loadable_best_config(ray_cluster: Any, tmp_path: Path) -> None:
    run = tmp_path / "tune-run"
    best_yaml = tmp_path / "best.yaml"
    args = [
        "tune",
        "--config",
        "smoke",
        "--storage",
        str(run),
        "--output",
        str(best_yaml),
        "--quiet",
        "--set",
        "generate.num_images=32",
        "--set",
        "generate.batch_size=16",
        "--set",
        "generate.iterations=2",
        "--set",
        "generate.shards_per_round=1",
        "--set",
        "quant.calibration_batches=1",
        "--set",
        "distill.epochs=2",
        "--set",
        "distill.batch_size=16",
        "--set",
        f"tune.num_samples={TRIALS}",
        "--set",
        "tune.max_concurrent=2",
        "--set",
        "tune.space={generate.bns_weight: [0.3, 3.0], generate.mdc_lower: [0.0, 0.2], "
        "distill.kd_alpha: [0.5, 2.0], distill.kd_temperature: [2.0, 6.0]}",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{TRIALS}/{TRIALS} trials ran" in result.output

    results = json.loads((run / RESULTS_PATH).read_text())
    trials = results["trials"]
    assert results["objective"] == "agreement" and len(trials) == TRIALS
    assert all(t["status"] in ("completed", "stopped") for t in trials), trials
    assert all(isinstance(t["objective"], float) for t in trials)
    completed = [t for t in trials if t["status"] == "completed"]
    assert completed and all(t["epochs"] == 2 for t in completed)
    # A completed trial's objective is its kept student's top-1 agreement with the teacher on the probe
    # images (data-free), recomputed here from the files the trial and the search wrote. ASHA stops a
    # trial at its last report, before it writes student.pt: the kept student is in the checkpoint of
    # the last epoch (written before that report, after the guard's choice).
    (probe_dir,) = (run / "tune").glob("probe-*")
    probe_data = Storage.from_url(str(probe_dir / "data"))
    probe_images = torch.as_tensor(read_all(probe_data, Manifest.load(probe_data))[0])
    teacher = RunContext.create(load_run_config("smoke")).teacher()
    for trial in completed:
        trial_dir = run / "tune" / f"trial-{trial['trial_id']}"
        state = torch.load(trial_dir / "train_state.pt", map_location="cpu", weights_only=True)
        assert state["epoch"] == 1, trial
        student, _, _, _ = load_student(trial_dir / "student_calibrated.pt")
        student.load_state_dict(state["distiller"]["student"])
        assert trial["objective"] == agreement(student, teacher, probe_images)["agreement"], trial
    # Every trial reported during generation, before its first epoch (ASHA can stop it there).
    assert all(t["generation_reports"] >= 1 for t in trials), trials
    assert all(t["generation_reports"] == 2 for t in completed)  # one per round
    best = max(completed, key=lambda t: t["objective"])
    assert trials[0] == best
    # Every trial generated its own dataset under <run>/tune/trial-<id>/, and one probe set exists.
    assert len(list((run / "tune").glob("trial-*/data/manifest.json"))) == TRIALS
    assert len(list((run / "tune").glob("probe-*/data/manifest.json"))) == 1

    # The best config round-trips: `run --config best.yaml` loads it, with the best trial's values.
    loaded = load_run_config(best_yaml)
    assert loaded == load_run_config(run / BEST_PATH)
    for key in ("generate.bns_weight", "generate.mdc_lower", "distill.kd_alpha", "distill.kd_temperature"):
        section, name = key.split(".")
        assert math.isclose(getattr(getattr(loaded, section), name), best[key]), key
    assert loaded.generate.num_images == 32 and loaded.distill.epochs == 2
    assert yaml.safe_load(best_yaml.read_text())["storage"]["url"] == str(run)
