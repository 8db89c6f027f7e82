"""What a stage needs from its run config (``pipeline.context``): which device the driver uses, and
the C allocator setting every process that opens the run applies.

``device: cuda`` on the Ray executor means the actors and Train workers use GPUs; the driver
(e.g. a CPU-only head node) does its own small work on the CPU instead of failing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_run_config
from pipeline.context import RunContext
from pipeline.run.job import open_run


def test_a_driver_without_a_gpu_runs_a_cuda_job_on_the_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if "ray" in sys.modules:  # a driver that has not joined a Ray yet (the session's test cluster may be up)
        monkeypatch.setattr(sys.modules["ray"], "is_initialized", lambda: False)
    # The head of a Ray cluster elsewhere (it may have, or scale up, GPU nodes).
    on_ray = load_run_config(
        None, ["device=cuda", "executor=ray", "ray.address=ray://10.0.0.5:10001", f"storage.url={tmp_path / 'run'}"]
    )
    ctx = RunContext.create(on_ray)
    assert ctx.driver_device == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):  # where the model work runs, cuda is required
        _ = ctx.device
    run = open_run(on_ray, "run")  # every check of the command passes on such a head
    assert run.executor.needs_ray and not any((tmp_path / "run").rglob("*"))  # nothing written
    # A local Ray has only this machine's GPUs: refused before anything is written.
    local_ray = load_run_config(None, ["device=cuda", "executor=ray", f"storage.url={tmp_path / 'local'}"])
    with pytest.raises(ValueError, match="no CUDA GPU"):
        open_run(local_ray, "run")
    assert not (tmp_path / "local").exists()

    local = RunContext.create(load_run_config(None, ["device=cuda", "executor=local"]))
    with pytest.raises(ValueError, match="no CUDA GPU"):  # the local executor is the model work
        _ = local.driver_device


def test_every_process_that_opens_a_run_sets_its_allocator_unless_the_config_says_system(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr("pipeline.context.reuse_freed_memory", lambda: calls.append(True) or True)
    reuse = load_run_config(None, [f"storage.url={tmp_path / 'a'}"])
    assert reuse.cpu_allocator == "reuse"  # the default
    RunContext.create(reuse)  # the driver, a generation actor, a trial
    RunContext(reuse, RunContext.create(reuse).storage)  # a Train worker builds its context from parts
    assert calls == [True, True, True]
    calls.clear()
    RunContext.create(load_run_config(None, ["cpu_allocator=system", f"storage.url={tmp_path / 'b'}"]))
    assert calls == []
