"""Shared fixtures: the real assets from ``INTRAQ_DATA_DIR`` (``../shared/data`` by default)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("INTRAQ_DATA_DIR", str((REPO / ".." / "shared" / "data").resolve()))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# One thread: on a shared 2-core box two OpenMP threads per process slow ops down 15-70x
# whenever another process (a Ray actor, a second test worker) runs at the same time.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["INTRAQ_DATA_DIR"])
    if not (path / "resnet20-12fca82f.th").is_file():
        raise RuntimeError(f"INTRAQ_DATA_DIR={path} does not hold the shared assets (see README)")
    return path


@pytest.fixture(scope="session")
def teacher_path(data_dir: Path) -> Path:
    return data_dir / "resnet20-12fca82f.th"


@pytest.fixture(scope="session")
def cifar10_test_path(data_dir: Path) -> Path:
    return data_dir / "cifar10_test.npz"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Back to one thread before every test: a run's context may have raised it."""
    torch.set_num_threads(1)


#: The xdist group of every test that starts or joins Ray (``make test`` runs two test processes).
RAY_GROUP = "ray"


def _uses_ray(item: pytest.Item) -> bool:
    return item.get_closest_marker("ray") is not None or "ray_cluster" in getattr(item, "fixturenames", ())


def pytest_itemcollected(item: pytest.Item) -> None:
    """Under pytest-xdist (``-n 2 --dist loadgroup``, as ``make test`` runs), every test that
    starts or joins Ray runs in one worker process: they share the session's two-node cluster
    (``ray_cluster``) and the reference run compared with it, so a second worker would start a
    second cluster and contend with the first. The other worker takes the rest (single-threaded
    torch: one core each). Marked as each item is collected, before xdist reads the groups in
    its own ``pytest_collection_modifyitems``. Without xdist the marker does nothing."""
    if _uses_ray(item):
        item.add_marker(pytest.mark.xdist_group(RAY_GROUP))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` the Ray group (the longest) is scheduled first, so it never ends
    last; a plain ``pytest`` keeps the collection order. (In an xdist worker ``dist`` reads "no"
    and ``loadgroup`` says how the session distributes.)"""
    if getattr(config.option, "loadgroup", False) or config.getvalue("dist") == "loadgroup":
        items.sort(key=lambda item: not _uses_ray(item))  # stable: each part keeps its order
