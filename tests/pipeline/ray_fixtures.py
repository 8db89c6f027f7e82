"""A local Ray cluster shared by every test of the session (starting one costs ~10 s, ~1.7 GB).

``ray_cluster`` (session) starts Ray once through :func:`pipeline.ray_session.start_ray`, the
product's own path: 4 logical CPUs (2 Train workers plus Ray Data read tasks fit: "Deadlock 1"
of docs/ray-on-a-small-box.md), node and dashboard on 127.0.0.1, dashboard on (the State API
that nested Tune + Train needs). It yields ``{"address", "dashboard_url", "local"}`` and shuts
Ray down at the end of the session. Stages called inside tests reuse this Ray, and their own
``start_ray``/``stop_ray`` pairs nest, so they never stop it.

It depends on the loopback S3 session so that ``AWS_ENDPOINT_URL`` and the fake credentials
are in the environment *before* Ray starts: workers inherit the raylet's environment, and a
worker started without the endpoint tries real AWS. (It uses the private ``_s3_session``
rather than ``s3_endpoint`` so Ray tests are not marked ``s3`` nor given its 60 s timeout.)

Use it by naming the fixture; ``tests/pipeline/conftest.py`` imports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

RAY_TEST_CPUS = 4


@pytest.fixture(scope="session")
def ray_cluster(_s3_session: Any) -> Iterator[dict[str, Any]]:
    """The session's local Ray: ``{"address", "dashboard_url", "local"}``."""
    import ray

    from pipeline.config import RunConfig
    from pipeline.ray_session import start_ray, stop_ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this test process; ray_cluster starts its own")
    cfg = RunConfig.model_validate({"ray": {"num_cpus": RAY_TEST_CPUS, "dashboard": True}})
    info = start_ray(cfg, None)
    try:
        yield info
    finally:
        stop_ray()
        if ray.is_initialized():  # a test called ray.init itself: still leave no Ray behind
            ray.shutdown()
