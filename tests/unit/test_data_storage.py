"""Storage URLs, local writes, and how S3 failures become errors that say what to fix.
(S3 itself is exercised against a real server in tests/integration/test_data_s3.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from data import storage
from data.storage import StorageError


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")


@pytest.fixture(autouse=True)
def _endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_urls_parse_to_buckets_keys_and_paths():
    s3 = storage.parse("s3://my-bucket/some/prefix/")
    assert (s3.is_s3, s3.bucket, s3.key) == (True, "my-bucket", "some/prefix")
    assert storage.parse("file:///data/set").path == Path("/data/set")
    assert storage.parse("relative/dir").path == Path("relative/dir")
    assert storage.join("s3://b-1/p/", "x.tar") == "s3://b-1/p/x.tar"
    with pytest.raises(ValueError, match="unsupported URL 'gs://x'"):
        storage.parse("gs://x")
    with pytest.raises(ValueError, match="no valid bucket name"):
        storage.parse("s3://")


def test_local_write_is_atomic_and_put_file_moves(tmp_path):
    target = tmp_path / "deep" / "manifest.json"
    storage.write_bytes(str(target), b"{}")
    assert target.read_bytes() == b"{}" and [p.name for p in target.parent.iterdir()] == [
        "manifest.json"
    ]
    local = tmp_path / "shard.tar"
    local.write_bytes(b"abc")
    storage.put_file(local, str(tmp_path / "out" / "shard.tar"))
    assert not local.exists()
    assert storage.has_content(
        str(tmp_path / "out" / "shard.tar"), 3, storage.sha256_file(tmp_path / "out" / "shard.tar")
    )
    assert not storage.has_content(str(tmp_path / "out" / "shard.tar"), 3, "0" * 64)
    assert storage.stat(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (NoCredentialsError(), "no AWS credentials found for s3://bkt/ds: set AWS_ACCESS_KEY_ID"),
        (
            EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
            "cannot reach the S3 endpoint http://127.0.0.1:9 for s3://bkt/ds",
        ),
        (_client_error("NoSuchBucket"), "bucket 'bkt' does not exist at http://127.0.0.1:9"),
        (_client_error("InvalidAccessKeyId"), "refused the credentials for s3://bkt/ds"),
        (_client_error("SignatureDoesNotMatch"), "check AWS_ACCESS_KEY_ID / AWS_SECRET"),
    ],
)
def test_s3_failures_name_what_to_fix(error, message):
    explained = storage.explain(error, "s3://bkt/ds")
    assert isinstance(explained, StorageError)
    assert message in str(explained)


def test_transient_errors_are_retried_and_others_are_not(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _client_error("SlowDown")
        return "done"

    assert storage.s3_call("s3://bkt/k", flaky, attempts=3) == "done"
    assert len(calls) == 3

    def denied() -> None:
        calls.append(1)
        raise _client_error("AccessDenied")

    calls.clear()
    with pytest.raises(StorageError, match="refused the credentials"):
        storage.s3_call("s3://bkt/k", denied, attempts=3)
    assert len(calls) == 1
    assert isinstance(storage.explain(_client_error("NoSuchKey"), "s3://bkt/k"), FileNotFoundError)


def test_data_package_loads_no_ray_train_mlflow_or_prefect():
    import subprocess
    import sys

    code = (
        "import sys, data, data.mnist\n"
        "light = sorted(m for m in ('torch', 'webdataset', 'boto3') if m in sys.modules)\n"
        "import data.shard, data.reader\n"
        "heavy = sorted(m for m in ('ray', 'mlflow', 'prefect') if m in sys.modules)\n"
        "print(','.join(light) + '|' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "|", result.stderr


def test_a_connection_closed_on_every_attempt_reads_as_an_unreachable_endpoint():
    from botocore import exceptions as bx

    from data.storage import StorageError, explain

    closed = bx.ConnectionClosedError(endpoint_url="http://127.0.0.1:1/ldm/x.tar")
    error = explain(closed, "s3://ldm/x.tar")
    assert isinstance(error, StorageError)
    assert "cannot reach the S3 endpoint" in str(error) and "x.tar" in str(error)


def test_an_upload_that_failed_on_a_transient_error_is_retried(monkeypatch):
    """boto3's upload_file wraps the client's error in S3UploadFailedError: a 500 from
    a server that is stopping is retried like any transient error, then explained."""
    from boto3.exceptions import S3UploadFailedError

    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    calls = []

    def upload(code: str) -> str:
        calls.append(code)
        if len(calls) < 3:
            try:
                raise _client_error(code)
            except Exception as error:
                raise S3UploadFailedError(f"Failed to upload x.tar: {error}")  # noqa: B904
        return "done"

    assert storage.s3_call("s3://bkt/x.tar", lambda: upload("InternalError"), attempts=3) == "done"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(StorageError, match="refused the credentials"):
        storage.s3_call("s3://bkt/x.tar", lambda: upload("AccessDenied"), attempts=3)
    assert len(calls) == 1
