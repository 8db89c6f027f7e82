"""Runs at the same time: the run lock (a heartbeat-refreshed lease), and two runs on one Ray cluster.

* A location where a run is in progress (its lock held by another live process) refuses a second
  run — even with ``--resume`` or ``--overwrite`` — with one clear line, touching nothing; once
  that process is SIGKILLed its lock is taken over at once (same host, pid gone), and a finished
  run leaves no lock behind.
* The lease is short and kept alive by a heartbeat; a lock taken over meanwhile is detected.
* Two runs started at once on the session's Ray cluster, at different locations, both complete
  with the dataset the local executor produces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from intraq_core.student import load_student
from pipeline.cli.app import app
from pipeline.config import load_run_config
from pipeline.errors import LockedError
from pipeline.stages.train import TRAIN_HISTORY_PATH
from pipeline.storage.lock import acquire_lock, run_lock
from pipeline.storage.store import Storage
from tests.pipeline.conftest import FAKE_SECRET
from tests.pipeline.run_helpers import GENTLE_LR, REPO, TINY, assert_one_line_error, cli_args, read_json, snapshot

runner = CliRunner()

HOLD_LOCK = """
import sys, time
from pipeline.storage.lock import run_lock
from pipeline.storage.store import Storage
with run_lock(Storage.from_url(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.mark.timeout(120)
def test_location_in_use_is_refused_and_recovered_after_a_crash(tmp_path: Path) -> None:
    url = tmp_path / "run"
    url.mkdir()
    cfg = load_run_config("smoke", [*TINY, f"storage.url={url}"])
    (url / "run.yaml").write_text(cfg.to_yaml())  # the first run got as far as recording its config
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(url)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = {k: v for k, v in snapshot(url).items() if k != "LOCK"}  # the holder refreshes LOCK
        for flag in ("--resume", "--overwrite"):
            res = runner.invoke(app, cli_args("run", str(url), flags=(flag,)))
            assert_one_line_error(res.output, res.exit_code, "is locked by owner", f"pid {holder.pid}", "wait for")
        assert {k: v for k, v in snapshot(url).items() if k != "LOCK"} == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The holder crashed: its lock is taken over at once and released when the new run ends.
    res = runner.invoke(app, cli_args("generate", str(url), flags=("--resume",)))
    assert res.exit_code == 0, res.output
    assert "4 shards" in res.output
    assert not (url / "LOCK").exists()


@pytest.mark.timeout(60)
def test_heartbeat_keeps_a_short_lease_and_notices_a_takeover(tmp_path: Path) -> None:
    storage = Storage.from_url(str(tmp_path))
    with run_lock(storage, ttl_s=0.6) as lock:
        first_expiry = lock.expires
        time.sleep(1.5)  # more than the lease: only the heartbeat keeps it
        record = read_json(tmp_path / "LOCK")
        assert record["expires"] > time.time() and record["expires"] > first_expiry
        with pytest.raises(LockedError, match="is locked by owner"):
            acquire_lock(storage, owner="second", ttl_s=60)
        lock.check()
    assert not (tmp_path / "LOCK").exists()

    with run_lock(storage, ttl_s=0.6, refresh_every_s=0.1) as lock:
        # Someone takes the lock over (as after an expired lease): the heartbeat notices and
        # the holder's next check fails; on exit the other holder's lock is left alone.
        record = read_json(tmp_path / "LOCK")
        record.update(token="someone-else", owner="other-host:1:x", host="other-host")
        (tmp_path / "LOCK").write_text(json.dumps(record))
        deadline = time.monotonic() + 5
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LockedError, match="was lost"):
            lock.check()
    assert read_json(tmp_path / "LOCK")["token"] == "someone-else"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_runs_at_once_on_one_ray_cluster(
    ray_cluster: dict[str, Any], s3_bucket: str, tmp_path: Path, gentle_reference: tuple[Path, dict[str, Any]]
) -> None:
    """Two drivers (separate CLI processes) share the session's Ray cluster at the same time.

    A runs the whole pipeline into a local directory on one Train worker, which must be the local
    executor's run bit for bit (the one training loop on either executor), B generates into loopback S3 (a full second
    ``run`` would double the cost: ~130 s instead of ~60 s on 2 cores). Both must produce the
    local executor's dataset byte for byte; A's calibrated student must be the local one's.
    """

    lr = GENTLE_LR  # small steps: Ray's stream order moves the student little (see test_ray_train)
    reference, ref = gentle_reference  # the local executor's run of the same config
    ray_settings = (
        "executor=ray",
        f"ray.address={ray_cluster['address']}",
        "ray.generation_actors=1",
        "ray.train_workers=1",
        "ray.cpus_per_train_worker=1",
        lr,
    )
    a, b = tmp_path / "a", f"{s3_bucket}/b"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli.app", *cli_args(command, str(url), *ray_settings)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for command, url in (("run", a), ("generate", b))
    ]
    try:
        outputs = [proc.communicate(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # SIGINT: Ray drivers stop their workers cleanly
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert FAKE_SECRET not in out + err
    assert "distilled" in outputs[0][0] and "4 shards, 32 images" in outputs[1][0]

    ref_manifest = (reference / "data" / "manifest.json").read_bytes()
    assert (a / "data" / "manifest.json").read_bytes() == ref_manifest  # same shards, byte for byte
    s3 = Storage.from_url(b)
    assert s3.read_bytes("data/manifest.json") == ref_manifest
    assert not (a / "LOCK").exists() and not s3.exists("LOCK")
    metrics = read_json(a / "metrics.json")
    assert metrics["executor"] == "ray" and metrics["training"]["final_epoch"]["epoch"] == 1
    # Same data and calibration images, and the same training: one Train worker holds its share in
    # memory (ray.train_data auto) and takes the local executor's batches in its order, so A's student
    # is the reference's bit for bit (test_ray_train), with B's job on the same cluster. No tolerance:
    # 4 steps at lr 1e-4 in another batch order move the top-1 on these 200 images by 0.5-5.5 points
    # (20 orders measured), so a tolerance wide enough for an order change would hide a wrong student.
    assert metrics["training"]["data"] == "memory"
    for key in ("fp_top1", "ptq_top1", "quant_top1"):
        assert metrics[key] == ref[key], (key, metrics[key], ref[key])
    for key in ("holdout_agreement_calibrated", "holdout_agreement_final"):
        assert metrics["training"][key] == ref["training"][key], key
    # Every epoch's loss, lr, step and held-out agreement, exactly (the Ray rows add their attempt and workers).
    history = read_json(a / TRAIN_HISTORY_PATH)
    assert [(row.pop("attempt"), row.pop("workers")) for row in history] == [(1, 1)] * len(history)
    assert history == read_json(reference / TRAIN_HISTORY_PATH) and all("holdout_agreement" in r for r in history)
    student = load_student(a / "student.pt")[0].state_dict()
    expected = load_student(reference / "student.pt")[0].state_dict()
    calibrated = load_student(reference / "student_calibrated.pt")[0].state_dict()
    assert student.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in student.items())
    assert any(not torch.equal(v, calibrated[k]) for k, v in expected.items()), "the reference did not train"
