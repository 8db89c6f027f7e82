"""The whole job on the Ray executor against the loopback S3 endpoint, with 2 Train workers."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow.parquet as pq
import pytest
import s3fs
from typer.testing import CliRunner

from pipeline.cli import app
from tests.pipeline.run_helpers import cli_args

runner = CliRunner()


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_run_on_s3_generates_trains_with_two_workers_and_evaluates(
    ray_cluster: dict[str, Any], s3_bucket: str, s3_endpoint: str
) -> None:
    url = f"{s3_bucket}/run"
    args = cli_args(
        "run",
        url,
        "executor=ray",
        "ray.generation_actors=2",
        "ray.train_workers=2",
        "ray.cpus_per_train_worker=0.5",
    )
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint, "region_name": "us-east-1"})
    root = url.removeprefix("s3://")
    metrics = json.loads(fs.cat(f"{root}/metrics.json"))
    assert metrics["executor"] == "ray"
    assert metrics["fp_top1"] > 85.0 and 0.0 < metrics["quant_top1"] <= 100.0
    history = json.loads(fs.cat(f"{root}/train_history.json"))
    assert history and all(row["workers"] == 2 for row in history)

    # Every shard of the manifest is a plain Parquet file any reader can open.
    manifest = json.loads(fs.cat(f"{root}/data/manifest.json"))
    assert manifest["complete"] and len(manifest["shards"]) == 4
    for entry in manifest["shards"]:
        table = pq.read_table(io.BytesIO(fs.cat(f"{root}/data/{entry['path']}")))
        assert table.num_rows == entry["rows"]
        assert set(table.column_names) >= {"image", "label", "seed", "index"}
        assert len(table.column("image")[0]) == 3 * 32 * 32
