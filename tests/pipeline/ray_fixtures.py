"""A two-node Ray cluster on this machine, shared by every test of the session.

``ray_cluster`` (session) simulates a cluster of two nodes with ``ray.cluster_utils.Cluster``:
a head and a worker node, each a separate raylet with its own resources (:data:`NODE_CPUS`
CPUs, a custom ``intraq_test_head`` / ``intraq_test_worker`` resource) and its own scratch
directory (``TMPDIR``), all bound to 127.0.0.1, the dashboard (whose State API nested Tune +
Train needs) on the head. The test process then joins it the way a driver joins any cluster,
through :func:`pipeline.ray.session.start_ray` with ``ray.address``. 4 logical CPUs in all:
2 Train workers plus Ray Data read tasks fit ("Deadlock 1" of docs/ray-on-a-small-box.md).
Starting it costs ~8-10 s and ~1.7 GB, once per session.

``terminal_bars()`` records the progress bars a command's driver would draw (see :class:`TerminalBars`).

It yields ``{"address", "dashboard_url", "local", "nodes"}`` (``nodes``: the node id of each
of ``"head"`` and ``"worker"``) and shuts the cluster down at the end of the session. Stages
called inside tests reuse this Ray, and their own ``start_ray``/``stop_ray`` pairs nest, so
they never stop it.

It depends on the loopback S3 session so that ``AWS_ENDPOINT_URL`` and the fake credentials
are in the environment *before* the nodes start: workers inherit their raylet's environment,
and a worker started without the endpoint tries real AWS. (It uses the private
``_s3_session`` rather than ``s3_endpoint`` so Ray tests are not marked ``s3`` nor given its
60 s timeout.)

Use it by naming the fixture; ``tests/pipeline/conftest.py`` imports it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

NODE_CPUS = 2
RAY_TEST_CPUS = 2 * NODE_CPUS
NODE_OBJECT_STORE_BYTES = 512 * 1024**2


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another test session may hold Ray's default 8265)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def ray_cluster(_s3_session: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The session's two-node Ray: ``{"address", "dashboard_url", "local", "nodes"}``."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import RunConfig
    from pipeline.ray.cluster import LOCAL_NODE_IP, loopback_only
    from pipeline.ray.session import start_ray, stop_ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this test process; ray_cluster starts its own")
    scratch = tmp_path_factory.mktemp("ray-nodes")

    def node(name: str, **extra: Any) -> dict[str, Any]:
        tmp = scratch / name
        tmp.mkdir()
        return {
            "num_cpus": NODE_CPUS,
            "node_ip_address": LOCAL_NODE_IP,
            "resources": {f"intraq_test_{name}": 1.0},
            "object_store_memory": NODE_OBJECT_STORE_BYTES,
            "env_vars": {"TMPDIR": str(tmp)},  # each node's own scratch disk
            **extra,
        }

    with loopback_only():
        cluster = Cluster(
            initialize_head=True,
            head_node_args=node(
                "head", include_dashboard=True, dashboard_host=LOCAL_NODE_IP, dashboard_port=_free_port()
            ),
        )
        cluster.add_node(**node("worker"))
    try:
        cluster.wait_for_nodes()
        info = start_ray(RunConfig.model_validate({"ray": {"address": cluster.address}}), None)
        try:
            nodes = {
                name: next(n["NodeID"] for n in ray.nodes() if n["Alive"] and f"intraq_test_{name}" in n["Resources"])
                for name in ("head", "worker")
            }
            yield {**info, "nodes": nodes}
        finally:
            stop_ray()
            if ray.is_initialized():  # a test called ray.init itself: still leave no Ray behind
                ray.shutdown()
    finally:
        cluster.shutdown()


class TerminalBars:
    """What the driver's ``tqdm_ray`` manager is given to draw, recorded instead of drawn: the last
    state of every bar, by its id (the driver's own bars and those sent by actors and Train workers)."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def process_state_update(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.states[state["uuid"]] = dict(state)

    def hide_bars(self) -> None:
        pass

    def unhide_bars(self) -> None:
        pass

    def named(self, prefix: str) -> list[dict[str, Any]]:
        """The last state of every bar whose description starts with ``prefix``."""
        with self._lock:
            return [s for s in self.states.values() if s["desc"].startswith(prefix)]

    def wait(self, done: Callable[[TerminalBars], bool], timeout: float = 30.0) -> None:
        """Until ``done(self)``: the workers' bar states reach the driver with their output, a moment later."""
        deadline = time.monotonic() + timeout
        while not done(self) and time.monotonic() < deadline:
            time.sleep(0.2)


@contextlib.contextmanager
def terminal_bars() -> Iterator[TerminalBars]:
    """The driver set up as the CLI sets it up (workers' output routed, :mod:`pipeline.cli.logs`),
    with ``tqdm_ray``'s manager replaced by a :class:`TerminalBars`."""
    from ray.experimental import tqdm_ray

    from pipeline.cli.logs import route_worker_output, stop_routing_worker_output

    bars = TerminalBars()
    manager = tqdm_ray.instance
    tqdm_ray.instance = lambda: bars
    try:
        assert route_worker_output(verbose=False)
        try:
            yield bars
        finally:
            stop_routing_worker_output()
    finally:
        tqdm_ray.instance = manager
