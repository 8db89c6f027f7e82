"""Storage: URLs, atomic writes, retries, credential errors and the run lock, on every backend."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.errors import LockedError, StorageError
from pipeline.storage.failures import redact
from pipeline.storage.location import StorageConfig
from pipeline.storage.lock import acquire_lock
from pipeline.storage.store import Storage
from tests.pipeline.conftest import FAKE_SECRET, S3Server

pytestmark = pytest.mark.timeout(60)


# -- config and URLs ----------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_has_no_credential_fields() -> None:
    with pytest.raises(ValidationError):
        StorageConfig(url="s3://bucket/x", secret_access_key="nope")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        StorageConfig(retries=-1)
    assert not {"key", "secret", "token", "aws_secret_access_key"} & set(StorageConfig.model_fields)


def test_endpoint_from_config_then_s3_specific_then_generic_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert StorageConfig().resolved_endpoint_url() == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert StorageConfig().resolved_endpoint_url() == "http://s3-specific:2"
    assert StorageConfig(endpoint_url="http://explicit:3").resolved_endpoint_url() == "http://explicit:3"
    # Resolved lazily: the saved config stays portable.
    assert StorageConfig().model_dump()["endpoint_url"] is None


@pytest.mark.parametrize("url", ["ftp://host/dir", "s4://bucket/run", "htps://x/y", "gs://bucket/run"])
def test_unsupported_scheme_is_a_one_line_storage_error(url: str) -> None:
    if url.startswith("gs://") and importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed, so gs:// is supported here")
    with pytest.raises(StorageError) as err:
        Storage.from_url(url)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "\n" not in message
    assert "s3://" in message and "memory://" in message and "file://" in message


def test_invalid_bucket_name_and_path_escape_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="bucket"):
        Storage.from_url("s3://ab/run")
    storage = Storage.from_url(str(tmp_path))
    with pytest.raises(StorageError, match="escapes"):
        storage.read_bytes("../outside")
    with pytest.raises(StorageError, match="URL"):
        storage.read_bytes("s3://other/x")


def test_join_and_url_per_backend(tmp_path: Path) -> None:
    assert Storage.from_url(str(tmp_path / "r")).join("a", "b.txt") == f"{tmp_path}/r/a/b.txt"
    assert Storage.from_url(f"file://{tmp_path}/r/").url == f"{tmp_path}/r"
    assert Storage.from_url("s3://my-bucket/runs/x/").join("manifest.json") == "s3://my-bucket/runs/x/manifest.json"
    assert Storage.from_url("s3a://my-bucket").url == "s3://my-bucket"
    assert Storage.from_url("memory://runs/x").join("a") == "memory:///runs/x/a"


# -- basic operations on every backend -----------------------------------------------------------


def test_round_trip_operations(any_storage: Storage) -> None:
    st = any_storage
    st.makedirs()
    st.check_writable()
    assert not st.exists("a/b.bin")
    assert st.ls("a") == []
    st.write_bytes_atomic("a/b.bin", b"\x00\x01payload")
    st.write_json_atomic("a/c.json", {"x": [1, 2], "y": "z"})
    assert st.exists("a/b.bin")
    assert st.read_bytes("a/b.bin") == b"\x00\x01payload"
    assert st.read_json("a/c.json") == {"x": [1, 2], "y": "z"}
    assert st.ls("a") == ["a/b.bin", "a/c.json"]  # no temporary files left behind
    assert "a" in st.ls()
    with st.open("a/d.txt", "wb") as f:
        f.write(b"streamed")
    with st.open("a/d.txt", "rb") as f:
        assert f.read() == b"streamed"
    st.write_bytes_atomic("a/b.bin", b"replaced")
    assert st.read_bytes("a/b.bin") == b"replaced"
    st.delete("a/b.bin")
    st.delete("a/b.bin")  # idempotent
    assert not st.exists("a/b.bin")
    with pytest.raises(FileNotFoundError):
        st.read_bytes("a/b.bin")
    with pytest.raises(StorageError, match=r"NaN|JSON|Out of range"):
        st.write_json_atomic("bad.json", {"loss": float("nan")})
    st.delete("a", recursive=True)
    assert st.ls("a") == []


def test_listing_is_not_stale_across_instances(any_storage: Storage) -> None:
    """A second process (another Storage) must see writes and deletes immediately."""
    reader = Storage.from_config(any_storage.config)
    assert reader.ls("shards") == []
    assert not reader.exists("shards/s0")
    any_storage.write_bytes_atomic("shards/s0", b"0")
    assert reader.ls("shards") == ["shards/s0"]
    assert reader.exists("shards/s0")
    any_storage.write_bytes_atomic("shards/s1", b"1")
    assert reader.ls("shards") == ["shards/s0", "shards/s1"]
    any_storage.delete("shards/s0")
    assert not reader.exists("shards/s0")
    assert reader.ls("shards") == ["shards/s1"]


def test_child_storage_is_rooted_below_its_parent(any_storage: Storage) -> None:
    child = any_storage.child("data")
    assert child.url == any_storage.join("data")
    assert child.config.retries == any_storage.config.retries
    child.write_bytes_atomic("manifest.json", b"{}")
    assert any_storage.read_bytes("data/manifest.json") == b"{}"
    assert any_storage.ls("data") == ["data/manifest.json"] and child.ls() == ["manifest.json"]


def test_pyarrow_filesystem_reads_what_storage_wrote(any_storage: Storage) -> None:
    any_storage.write_bytes_atomic("x/data.bin", b"abc")
    fs, root = any_storage.pyarrow_filesystem()
    assert any_storage.pyarrow_path("x/data.bin") == f"{root}/x/data.bin"
    with fs.open_input_stream(f"{root}/x/data.bin") as f:
        assert f.read() == b"abc"


def test_storage_pickles_as_its_config_without_secrets(any_storage: Storage) -> None:
    blob = pickle.dumps(any_storage)
    clone = pickle.loads(blob)
    assert clone.url == any_storage.url
    assert FAKE_SECRET.encode() not in blob
    fs, _ = any_storage.pyarrow_filesystem()
    if any_storage.kind != "memory":  # the in-memory fsspec store is process-local by design
        assert FAKE_SECRET.encode() not in pickle.dumps(fs)


# -- local atomicity and permissions ------------------------------------------------------------


def test_local_atomic_write_never_leaves_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = Storage.from_url(str(tmp_path), retries=0)
    st.write_bytes_atomic("m.json", b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="No space left"):
        st.write_bytes_atomic("m.json", b"new content")
    monkeypatch.undo()
    assert st.read_bytes("m.json") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_unwritable_local_location_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    st = Storage.from_url(str(blocker / "run"))
    with pytest.raises(StorageError) as err:
        st.check_writable()
    assert str(blocker) in str(err.value)


# -- S3: credentials, endpoint failures, retries -------------------------------------------------


def test_unknown_s3_key_is_a_storage_error_without_the_secret(
    s3_bucket: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = Storage.from_url(s3_bucket + "/run", retries=5, retry_backoff_s=0.5)
    t0 = time.monotonic()
    with s3_server.require_auth(), pytest.raises(StorageError) as err:
        st.check_writable()
    assert time.monotonic() - t0 < 3, "credential errors must not be retried"
    message = str(err.value)
    assert "InvalidAccessKeyId" in message and "AWS_ACCESS_KEY_ID" in message
    assert FAKE_SECRET not in message and "\n" not in message


def _iam_user_key(endpoint: str) -> tuple[str, str]:
    """Create an IAM user allowed to use S3 in moto; return its (key id, secret)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    iam.create_user(UserName="intraq-tester")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="intraq-tester", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="intraq-tester")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_wrong_s3_secret_is_rejected_and_right_one_accepted(
    s3_bucket: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id, secret = _iam_user_key(s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    wrong = "wrong-secret-value-0123456789"
    with s3_server.require_auth():
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        Storage.from_url(s3_bucket + "/run").check_writable()
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        with pytest.raises(StorageError) as err:
            Storage.from_url(s3_bucket + "/run").check_writable()
    message = str(err.value)
    assert "SignatureDoesNotMatch" in message
    assert wrong not in message and secret not in message and FAKE_SECRET not in message


def test_missing_s3_credentials_is_a_clear_storage_error(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"NoCredentialsError.*AWS_PROFILE"):
        Storage.from_url(s3_bucket + "/run").check_writable()
    assert time.monotonic() - t0 < 5


def test_missing_bucket_is_named(s3_endpoint: str) -> None:
    with pytest.raises(StorageError, match="bucket 'intraq-no-such-bucket' does not exist"):
        Storage.from_url("s3://intraq-no-such-bucket/run").check_writable()


def test_endpoint_down_fails_after_bounded_retries(s3_bucket: str, s3_server: S3Server) -> None:
    st = Storage.from_url(s3_bucket + "/run", retries=2, retry_backoff_s=0.05)
    st.write_bytes_atomic("x", b"1")
    s3_server.stop()
    t0 = time.monotonic()
    with pytest.raises(StorageError) as err:
        st.read_bytes("x")
    elapsed = time.monotonic() - t0
    assert "after 3 attempts" in str(err.value) and s3_server.endpoint in str(err.value)
    assert elapsed < 5
    s3_server.start()
    assert st.read_bytes("x") == b"1"  # same port, same data: the run can continue


def test_unreachable_endpoint_with_default_retries_fails_in_seconds(s3_bucket: str) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    st = Storage.from_url(s3_bucket + "/run", endpoint_url=f"http://127.0.0.1:{port}", retry_backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="after 6 attempts"):
        st.check_writable()
    assert time.monotonic() - t0 < 5


def test_transient_outage_is_retried_until_it_recovers(s3_bucket: str, s3_server: S3Server) -> None:
    st = Storage.from_url(s3_bucket + "/run", retries=6, retry_backoff_s=0.1)
    st.write_bytes_atomic("x", b"payload")
    s3_server.stop()
    timer = threading.Timer(0.4, s3_server.start)
    timer.start()
    try:
        assert st.read_bytes("x") == b"payload"
    finally:
        timer.join()


# -- lock -----------------------------------------------------------------------------------------


def test_lock_acquire_conflict_release(any_storage: Storage) -> None:
    lock = acquire_lock(any_storage, owner="run-a", ttl_s=60)
    record = any_storage.read_json("LOCK")
    assert {"owner", "host", "pid", "created", "expires"} <= set(record)
    assert record["owner"] == "run-a" and record["pid"] == os.getpid()
    with pytest.raises(LockedError) as err:
        acquire_lock(any_storage, owner="run-b", ttl_s=60)
    message = str(err.value)
    assert "run-a" in message and "delete" in message and any_storage.join("LOCK") in message
    before = lock.expires
    time.sleep(0.01)
    lock.refresh()
    assert lock.expires > before
    assert any_storage.read_json("LOCK")["expires"] == lock.expires
    lock.release()
    assert not any_storage.exists("LOCK")
    with acquire_lock(any_storage, owner="run-b", ttl_s=60) as lock_b:
        assert lock_b.owner == "run-b"
    assert not any_storage.exists("LOCK")


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_lock_of_a_dead_process_is_taken_over(any_storage: Storage) -> None:
    stale = acquire_lock(any_storage, owner="crashed-run", ttl_s=3600)
    record = any_storage.read_json("LOCK")
    record["pid"] = _dead_pid()
    any_storage.write_json_atomic("LOCK", record)
    lock = acquire_lock(any_storage, owner="resumed-run", ttl_s=60)
    assert any_storage.read_json("LOCK")["owner"] == "resumed-run"
    with pytest.raises(LockedError, match="lost"):
        stale.refresh()
    stale.release()  # must not remove the new holder's lock
    assert any_storage.read_json("LOCK")["owner"] == "resumed-run"
    lock.release()


def test_lock_on_another_host_is_live_until_its_lease_expires(tmp_path: Path) -> None:
    st = Storage.from_url(str(tmp_path))
    now = time.time()
    record = {"owner": "other", "host": "some-other-host", "pid": 1, "created": now, "expires": now + 0.3}
    st.write_json_atomic("LOCK", record)
    with pytest.raises(LockedError, match="some-other-host"):
        acquire_lock(st, owner="me", ttl_s=60)
    time.sleep(0.35)
    acquire_lock(st, owner="me", ttl_s=60).release()


def test_redact_removes_secret_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abc/def+ghiSECRET")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-EN-value")
    text = "sig abc/def+ghiSECRET and abc%2Fdef%2BghiSECRET with tok-EN-value"
    assert redact(text) == "sig *** and *** with ***"
