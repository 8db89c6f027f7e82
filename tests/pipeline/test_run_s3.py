"""The whole job on a two-node Ray cluster against the loopback S3 endpoint.

The session's cluster (``tests/pipeline/ray_fixtures.py``) has two nodes, each with its own
CPUs and its own scratch directory. The run uses only S3 storage, 2 generation actors (spread
one per node) and 2 Train workers placed one per node (``ray.train_placement=spread``),
streaming their data from S3 (``ray.train_data=stream``). It must complete, put work on both
nodes, write shards that plain pyarrow reads, and reach the numbers the local executor reaches
on the same config wherever they must match exactly: the calibrated student (the driver picks
the local executor's calibration images out of S3) and its held-out agreement (summed over
the two workers' streamed shares of the held-out images).
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from typer.testing import CliRunner

from intraq_core.student import load_student
from pipeline.cli.app import app
from tests.pipeline.run_helpers import FP_TOP1_200, GENTLE_LR, MAX_MOVE, cli_args

runner = CliRunner()


def _actors(class_name: str) -> dict[str, str]:
    """``actor id → node id`` of every actor of that class the cluster knows (alive or dead)."""
    from ray.util.state import list_actors

    listed = list_actors(filters=[("class_name", "=", class_name)], limit=10_000, raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in listed}


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_run_on_two_nodes_and_s3(
    ray_cluster: dict[str, Any], s3_bucket: str, s3_endpoint: str, gentle_reference: tuple[Any, dict[str, Any]]
) -> None:
    reference = gentle_reference[1]  # the local executor's run of the same config
    before = {name: _actors(name) for name in ("GeneratorActor", "RayTrainWorker")}
    url = f"{s3_bucket}/run"
    args = cli_args(
        "run",
        url,
        "executor=ray",
        "ray.generation_actors=2",
        "ray.train_workers=2",
        "ray.cpus_per_train_worker=1",
        "ray.train_placement=spread",
        "ray.train_data=stream",
        GENTLE_LR,
    )
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output

    # Generation actors and Train workers ran on both nodes.
    both = set(ray_cluster["nodes"].values())
    for name, earlier in before.items():
        new = {actor: node for actor, node in _actors(name).items() if actor not in earlier}
        assert set(new.values()) == both, (name, new, ray_cluster["nodes"])

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint, "region_name": "us-east-1"})
    root = url.removeprefix("s3://")
    metrics = json.loads(fs.cat(f"{root}/metrics.json"))
    assert metrics["executor"] == "ray" and metrics["training"]["data"] == "stream"
    assert (metrics["train_workers"], metrics["global_batch_size"]) == (2, reference["global_batch_size"])
    assert metrics["optimizer_steps"] == reference["optimizer_steps"]
    assert metrics["fp_top1"] == reference["fp_top1"] == FP_TOP1_200
    assert metrics["ptq_top1"] == reference["ptq_top1"]
    # The two workers stream the rows in another order than the local executor, so the trained student
    # is another draw of the same recipe (small steps: GENTLE_LR): its top-1 must lie as near the
    # calibrated start as this recipe moves it (MAX_MOVE), and the student must have moved.
    assert abs(metrics["quant_top1"] - metrics["ptq_top1"]) <= MAX_MOVE, (metrics["quant_top1"], metrics["ptq_top1"])
    trained = load_student(fs.cat(f"{root}/student.pt"))[0].state_dict()
    calibrated = load_student(fs.cat(f"{root}/student_calibrated.pt"))[0].state_dict()
    assert any(not torch.equal(v, calibrated[k]) for k, v in trained.items()), "the workers did not train"
    assert metrics["training"]["holdout_agreement_calibrated"] == reference["training"]["holdout_agreement_calibrated"]
    # The driver calibrated on the local executor's batches: the same ranking of the activation tensors.
    ranked = metrics["training"]["activation_sensitivity"]
    assert ranked and ranked == reference["training"]["activation_sensitivity"]
    history = json.loads(fs.cat(f"{root}/train_history.json"))
    assert history and all(row["workers"] == 2 for row in history)
    assert fs.ls(f"{root}/ray_train"), "Ray Train's checkpoints live on S3"

    # Every shard of the manifest is a plain Parquet file any reader can open.
    manifest = json.loads(fs.cat(f"{root}/data/manifest.json"))
    assert manifest["complete"] and len(manifest["shards"]) == 4
    for entry in manifest["shards"]:
        table = pq.read_table(io.BytesIO(fs.cat(f"{root}/data/{entry['path']}")))
        assert table.num_rows == entry["rows"]
        assert set(table.column_names) >= {"image", "label", "seed", "index"}
        assert len(table.column("image")[0]) == 3 * 32 * 32
