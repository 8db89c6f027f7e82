"""The Ray session (start/reuse/stop, worker environment), metrics helpers, and the CLI on Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import RunConfig
from pipeline.ray.session import WORKER_ENV_VARS, start_ray, stop_ray, worker_env_vars
from tests.pipeline.conftest import FAKE_SECRET


def test_worker_env_vars_forward_settings_never_secrets() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_SESSION_TOKEN": "token",
        "RAY_AUTH_TOKEN": "ray-token",
        "INTRAQ_DATA_DIR": "relative/data",
        "INTRAQ_CACHE_DIR": "",
    }
    out = worker_env_vars(env)
    assert out == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "INTRAQ_DATA_DIR": os.path.abspath("relative/data"),
    }
    assert set(WORKER_ENV_VARS).isdisjoint({"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"})


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_session_ray_is_local_on_loopback(ray_cluster: dict[str, Any]) -> None:
    import ray

    assert ray_cluster["local"] is True
    assert ray_cluster["address"].startswith("127.0.0.1:")
    assert ray_cluster["dashboard_url"].startswith("http://127.0.0.1:")
    assert ray.cluster_resources()["CPU"] == 4
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_start_ray_reuses_a_running_ray_and_nested_stop_keeps_it(ray_cluster: dict[str, Any]) -> None:
    import ray

    info = start_ray(RunConfig.model_validate({"ray": {"num_cpus": 1, "dashboard": False}}), None)
    assert info["address"] == ray_cluster["address"]
    assert info["dashboard_url"] == ray_cluster["dashboard_url"]
    stop_ray()
    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == 4


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_workers_get_settings_through_runtime_env_but_no_secret(ray_cluster: dict[str, Any]) -> None:
    import ray

    runtime_env = ray.get_runtime_context().runtime_env
    env_vars = runtime_env.get("env_vars", {})
    assert env_vars["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]
    assert os.path.isabs(env_vars["INTRAQ_DATA_DIR"])
    assert FAKE_SECRET not in json.dumps(runtime_env)
    assert "AWS_SECRET_ACCESS_KEY" not in env_vars

    @ray.remote(num_cpus=0)
    def read_env() -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "INTRAQ_DATA_DIR")}

    seen = ray.get(read_env.remote(), timeout=60)
    assert seen["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]
    assert seen["INTRAQ_DATA_DIR"] == env_vars["INTRAQ_DATA_DIR"]


def test_metrics_are_a_no_op_outside_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from pipeline.ray import metrics

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    m = metrics.Metric("gauge", "intraq_test_outside", "test", ("run",))
    m.set(1.0, run="x")
    assert m._impl is None
    metrics.SHARDS_DONE.inc(run="x")
    with pytest.raises(ValueError, match="unknown tags"):
        m.set(1.0, worker="0")
    with pytest.raises(TypeError, match="use set"):
        m.inc()


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_metrics_record_in_ray_and_fill_missing_tags(ray_cluster: dict[str, Any]) -> None:
    from pipeline.ray import metrics

    metrics.DISTILL_LOSS.set(0.5, run="t")  # "worker" tag missing: recorded as ""
    metrics.DISTILL_SAMPLES_PER_S.set(10.0, run="t", worker=0)
    assert metrics.DISTILL_LOSS._impl is not None and not metrics.DISTILL_LOSS._disabled


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_cli_generate_with_the_ray_executor(ray_cluster: dict[str, Any], tmp_path: Path) -> None:
    """``intraq-pipeline generate`` on Ray: lock, run.yaml, shards; the session's Ray survives."""
    import ray
    from typer.testing import CliRunner

    from pipeline.cli.app import app

    out = tmp_path / "run"
    sets = [
        "executor=ray",
        "device=cpu",
        "generate.num_images=16",
        "generate.batch_size=8",
        "generate.iterations=3",
        "ray.generation_actors=1",
    ]
    args = ["generate", "-q", "-o", str(out)] + [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"2 shards, 16 images at {out}/data" in result.stdout
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 1]
    assert (out / "run.yaml").is_file() and not (out / "LOCK").exists()
    assert ray.is_initialized()  # the CLI's start_ray/stop_ray nested inside the session's

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
