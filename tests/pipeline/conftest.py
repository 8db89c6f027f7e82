"""Loopback S3 for pipeline tests: a real moto server on 127.0.0.1, never a mock of s3fs.

* ``s3_endpoint`` (session): starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1 and a free
  port, sets fake AWS credentials, region and ``AWS_ENDPOINT_URL`` for the whole session
  (restored afterwards) and yields the endpoint URL.
* ``s3_server`` (function): the running server as an :class:`S3Server` with ``stop()`` /
  ``start()`` (same port, same data: "the endpoint stops answering mid-run") and
  ``require_auth()`` (moto then checks signatures, so wrong credentials are rejected). After
  each test the server is running again with authentication off.
* ``s3_bucket`` (function): a fresh, uniquely named bucket as ``s3://name``; moto's state is
  reset afterwards.
* ``any_storage`` (function, parametrized): a :class:`Storage` on each backend (local path,
  ``file://``, ``memory://``, loopback ``s3://``).

Tests using these fixtures are marked ``s3`` and get a 60 s timeout unless they set their own.
``FAKE_SECRET`` is the secret key in the environment, so tests can check it never leaks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from pipeline.storage.store import Storage
from tests.pipeline.ray_fixtures import ray_cluster  # noqa: F401  (session Ray fixture)

FAKE_KEY_ID = "testing-key-id"
FAKE_SECRET = "intraq-FAKE-secret-3f9a1c7e5b2d4f60-do-not-print"
REGION = "us-east-1"
S3_FIXTURES = {"s3_endpoint", "s3_server", "s3_bucket"}
DEFAULT_S3_TIMEOUT_S = 60

# Variables the session sets (value) or removes (None) so no developer or CI setting leaks in.
_ENV_UNSET = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the loopback S3 fixtures ``s3`` and give it a timeout."""
    for item in items:
        if S3_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(DEFAULT_S3_TIMEOUT_S))


class S3Server:
    """A moto S3 server on 127.0.0.1 that can be stopped and restarted on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server currently accepts connections."""
        return self._server is not None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start (or restart) the server; the first start picks a free port, later ones reuse it.

        ``ThreadedMotoServer.start`` waits forever when the port cannot be bound, so it runs
        in a helper thread with a timeout.
        """
        if self._server is not None:
            return
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        starter = threading.Thread(target=server.start, daemon=True)
        starter.start()
        starter.join(timeout_s)
        if starter.is_alive():
            raise RuntimeError(f"moto server could not start on 127.0.0.1:{self.port}")
        self.port = server.get_host_and_port()[1]
        self._server = server

    def stop(self) -> None:
        """Stop answering: later connections to the port are refused (data is kept in memory)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.stop()
        # ThreadedMotoServer.stop() leaves the listening socket open (connections would then hang
        # in the backlog instead of being refused, and the port could not be bound again).
        wsgi = getattr(server, "_server", None)
        if wsgi is not None:
            wsgi.server_close()

    def _post(self, path: str, body: bytes = b"") -> None:
        # Not form-encoded (urllib's default), or moto reads an empty request.data.
        headers = {"Content-Type": "text/plain"}
        req = urllib.request.Request(self.endpoint + path, data=body, method="POST", headers=headers)
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def reset(self) -> None:
        """Delete every bucket and object (``POST /moto-api/reset``)."""
        self._post("/moto-api/reset")

    def set_auth(self, enabled: bool) -> None:
        """Make moto verify request signatures against its IAM users (off by default)."""
        self._post("/moto-api/reset-auth", b"0" if enabled else b"inf")

    @contextlib.contextmanager
    def require_auth(self) -> Iterator[S3Server]:
        """Within the block, requests with unknown keys or wrong secrets are rejected."""
        self.set_auth(True)
        try:
            yield self
        finally:
            self.set_auth(False)

    def create_bucket(self, name: str) -> str:
        """Create a bucket with an unsigned PUT (moto accepts it while auth is off)."""
        req = urllib.request.Request(f"{self.endpoint}/{name}", data=b"", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
        return f"s3://{name}"


@pytest.fixture(scope="session")
def _s3_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = S3Server()
    server.start()
    no_aws_dir: Path = tmp_path_factory.mktemp("no-aws-config")
    settings: dict[str, str | None] = {name: None for name in _ENV_UNSET}
    settings.update(
        {
            "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": server.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(no_aws_dir / "credentials"),
            "AWS_CONFIG_FILE": str(no_aws_dir / "config"),
        }
    )
    saved = {name: os.environ.get(name) for name in settings}
    for name, value in settings.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def s3_endpoint(_s3_session: S3Server) -> str:
    """URL of the loopback S3 endpoint (also in ``AWS_ENDPOINT_URL``)."""
    return _s3_session.endpoint


@pytest.fixture()
def s3_server(_s3_session: S3Server) -> Iterator[S3Server]:
    """The loopback server, restarted and with auth off again after the test."""
    _s3_session.start()
    try:
        yield _s3_session
    finally:
        _s3_session.start()
        _s3_session.set_auth(False)


@pytest.fixture()
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh bucket ``s3://intraq-test-<random>``; all S3 state is reset afterwards."""
    url = s3_server.create_bucket(f"intraq-test-{uuid.uuid4().hex[:12]}")
    try:
        yield url
    finally:
        s3_server.start()
        s3_server.reset()


@pytest.fixture(params=["local", "file", "memory", pytest.param("s3", marks=[pytest.mark.s3, pytest.mark.timeout(60)])])
def any_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """One run location per backend: a local path, ``file://``, ``memory://`` and loopback ``s3://``."""
    kind = request.param
    if kind == "local":
        url = str(tmp_path / "run")
    elif kind == "file":
        url = f"file://{tmp_path}/run"
    elif kind == "memory":
        url = f"memory://intraq-tests/{uuid.uuid4().hex}/run"
    else:
        url = request.getfixturevalue("s3_bucket") + "/run"
    storage = Storage.from_url(url, retries=1, retry_backoff_s=0.01)
    try:
        yield storage
    finally:
        if kind == "memory":
            storage.delete("", recursive=True)


@pytest.fixture(scope="session")
def gentle_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The local executor's run of TINY at ``GENTLE_LR``: ``(location, metrics)``, made once for the
    Ray runs compared with it (``test_run_s3``, ``test_concurrency``). Read it, never write into it."""
    from pipeline.config import load_run_config
    from pipeline.run.job import run_pipeline
    from tests.pipeline.run_helpers import GENTLE_LR, TINY

    where = tmp_path_factory.mktemp("gentle-reference") / "run"
    metrics = run_pipeline(load_run_config("smoke", [*TINY, GENTLE_LR, f"storage.url={where}"]), progress=False)
    return where, metrics
