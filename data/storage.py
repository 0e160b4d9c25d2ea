"""Where datasets live: a local folder (plain path or ``file://``) or ``s3://bucket/prefix``.

S3 goes through boto3 with the standard configuration chain: the endpoint comes from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, credentials from the environment, a
profile or an instance role. Every failure a user can fix (no credentials, rejected
credentials, missing bucket, unreachable endpoint) becomes a :class:`StorageError`
that says what to fix.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from data.environment import S3_CLIENT_ENV

_T = TypeVar("_T")

# Objects above this size go up as multipart uploads, in parts of this size.
MULTIPART_BYTES = 64 * 1024 * 1024
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "SlowDown", "RequestTimeout"}
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"}


class StorageError(RuntimeError):
    """A storage problem the user can fix; the message names what to fix."""


class PermanentStorageError(StorageError):
    """A storage error that retrying cannot fix (a missing bucket, refused or missing
    credentials): orchestrators fail at once instead of retrying."""


@dataclass(frozen=True)
class Location:
    """A parsed URL: ``bucket`` and ``key`` for S3, ``path`` for local storage."""

    url: str
    bucket: str = ""
    key: str = ""
    path: Path | None = None

    @property
    def is_s3(self) -> bool:
        return self.path is None


@dataclass(frozen=True)
class Listed:
    """One object found under a prefix; ``name`` is relative to it, with ``/`` separators."""

    name: str
    url: str
    size: int


_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):(?P<rest>.*)$")
# Schemes a user may type by mistake for one of ours; anything else with "://" is refused.
_KNOWN_SCHEMES = {
    "s3",
    "s3a",
    "s3n",
    "file",
    "gs",
    "gcs",
    "az",
    "abfs",
    "abfss",
    "hdfs",
    "http",
    "https",
    "ftp",
    "sftp",
}


def parse(url: str) -> Location:
    """``s3://bucket/key`` → bucket and key; ``file:///p`` or a plain path → local path.

    A URL that is almost one of these (``s3:/bucket``, ``S3://bucket``, ``s3a://…``) or
    names another scheme is a ValueError saying what was probably meant; it never
    silently becomes a local folder."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"expected a local path, file:// or s3:// URL, got {url!r}")
    if url.startswith("s3://"):
        bucket, _, key = url[len("s3://") :].partition("/")
        if len(bucket) < 3:
            raise ValueError(f"'{url}' has no valid bucket name; expected s3://bucket/prefix")
        return Location(url=url, bucket=bucket, key=key.strip("/"))
    if url.startswith("file://"):
        return Location(url=url, path=Path(url[len("file://") :]))
    match = _SCHEME.match(url)
    if match and ("://" in url or match["scheme"].lower() in _KNOWN_SCHEMES):
        raise ValueError(_malformed(url, match["scheme"], match["rest"]))
    return Location(url=url, path=Path(url))


def _malformed(url: str, scheme: str, rest: str) -> str:
    """The error for a URL we do not read, with the likely intended spelling."""
    tail = rest.lstrip("/")
    lower = scheme.lower()
    if lower in ("s3", "s3a", "s3n"):
        return f"'{url}' is not a valid S3 URL: did you mean 's3://{tail}'?"
    if lower == "file":
        return f"'{url}' is not a valid file URL: did you mean 'file:///{tail}' (or a plain path)?"
    return (
        f"unsupported URL '{url}': use a local path, file:///absolute/path or "
        "s3://bucket/prefix (other stores are reachable through their S3 API)"
    )


def join(url: str, name: str) -> str:
    """The URL of ``name`` inside the folder or prefix ``url``."""
    return url.rstrip("/") + "/" + name


def s3_client() -> Any:
    """A boto3 S3 client for this process and the current AWS environment variables."""
    return _cached_client(os.getpid(), tuple(os.environ.get(v) for v in S3_CLIENT_ENV))


@functools.lru_cache(maxsize=8)
def _cached_client(pid: int, env: tuple[str | None, ...]) -> Any:
    # One client per process (boto3 clients do not survive fork) and per environment.
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard"}, connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client("s3", config=config)


def _endpoint() -> str:
    return s3_client().meta.endpoint_url


def explain(error: Exception, url: str) -> Exception:
    """Turn a botocore error into a :class:`StorageError` that says what to fix."""
    from botocore import exceptions as bx

    endpoint = _endpoint()
    bucket = parse(url).bucket
    if isinstance(error, bx.NoCredentialsError | bx.PartialCredentialsError):
        return PermanentStorageError(
            f"no AWS credentials found for {url}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    # A connection closed on every attempt is an endpoint that stopped answering.
    unreachable = bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ConnectionClosedError
    if isinstance(error, unreachable):
        return StorageError(
            f"cannot reach the S3 endpoint {endpoint} for {url} ({error}): start the S3 "
            "server or set AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) to its address"
        )
    if not isinstance(error, bx.ClientError):
        return StorageError(f"S3 request for {url} at {endpoint} failed: {error}")
    code = str(error.response.get("Error", {}).get("Code", ""))
    if code == "NoSuchBucket":
        return PermanentStorageError(
            f"bucket '{bucket}' does not exist at {endpoint}: create it or fix the URL {url}"
        )
    if code in _AUTH_CODES:
        return PermanentStorageError(
            f"the S3 endpoint {endpoint} refused the credentials for {url} ({code}): check "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions"
        )
    if code in ("NoSuchKey", "404"):
        return FileNotFoundError(f"{url} does not exist at {endpoint}")
    return StorageError(f"S3 request for {url} failed at {endpoint}: {error}")


def s3_call(url: str, fn: Callable[[], _T], attempts: int = 1) -> _T:
    """Run ``fn``, retrying transient failures ``attempts`` times with backoff."""
    from boto3.exceptions import S3UploadFailedError
    from botocore import exceptions as bx

    for attempt in range(attempts):
        try:
            return fn()
        except (bx.BotoCoreError, bx.ClientError, S3UploadFailedError) as raised:
            # upload_file wraps the client's error (a 500 from a stopping server, say)
            cause = raised.__cause__ or raised.__context__
            wrapped = isinstance(raised, S3UploadFailedError)
            error = (
                cause
                if wrapped and isinstance(cause, bx.BotoCoreError | bx.ClientError)
                else raised
            )
            code = error.response["Error"].get("Code") if isinstance(error, bx.ClientError) else ""
            transient = code in _TRANSIENT_CODES or isinstance(
                error, bx.ConnectionClosedError | bx.ReadTimeoutError
            )
            if not transient or attempt == attempts - 1:
                raise explain(error, url) from error
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def check_access(url: str) -> None:
    """Fail now, with a clear :class:`StorageError`, if ``url`` cannot be listed."""
    loc = parse(url)
    if loc.is_s3:
        client = s3_client()
        s3_call(url, lambda: client.list_objects_v2(Bucket=loc.bucket, MaxKeys=1))
    elif not loc.path.exists():
        raise FileNotFoundError(f"{url} does not exist")


def stat(url: str) -> tuple[int, dict[str, str]] | None:
    """``(size in bytes, user metadata)`` of an object or file; None if it does not exist."""
    loc = parse(url)
    if not loc.is_s3:
        return (loc.path.stat().st_size, {}) if loc.path.is_file() else None
    client = s3_client()
    try:
        head = s3_call(url, lambda: client.head_object(Bucket=loc.bucket, Key=loc.key))
    except FileNotFoundError:
        return None
    return head["ContentLength"], head.get("Metadata", {})


def has_content(url: str, size: int, sha256: str) -> bool:
    """Whether ``url`` already holds exactly this content (S3: size and the ``sha256``
    metadata written by :func:`put_file`; local: size and a fresh hash)."""
    found = stat(url)
    if found is None or found[0] != size:
        return False
    loc = parse(url)
    if loc.is_s3:
        return found[1].get("sha256") == sha256
    return sha256_file(loc.path) == sha256


def read_bytes(url: str) -> bytes:
    """The whole content of a file or object (for small things: manifests, images)."""
    loc = parse(url)
    if not loc.is_s3:
        return loc.path.read_bytes()
    client = s3_client()
    return s3_call(url, lambda: client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read(), 3)


def open_stream(url: str) -> IO[bytes]:
    """A binary stream over a file or object, read sequentially (S3: resumed on errors)."""
    loc = parse(url)
    if not loc.is_s3:
        return open(loc.path, "rb")  # the caller closes it
    return _S3Stream(url)


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` atomically: readers see the old content or the new, never a part."""
    loc = parse(url)
    if loc.is_s3:
        client = s3_client()
        s3_call(url, lambda: client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data), 3)
        return
    loc.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = loc.path.with_name(f".{loc.path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, loc.path)


def put_file(local: Path, url: str, metadata: dict[str, str] | None = None) -> None:
    """Move a finished local file to ``url`` (S3: multipart upload above 64 MiB, retried)."""
    loc = parse(url)
    if not loc.is_s3:
        loc.path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(local, loc.path)
        return
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES
    )
    extra = {"Metadata": metadata or {}}
    client = s3_client()
    s3_call(
        url, lambda: client.upload_file(str(local), loc.bucket, loc.key, extra, None, config), 4
    )
    local.unlink()


def delete(url: str) -> None:
    """Remove a file or object if it exists."""
    loc = parse(url)
    if not loc.is_s3:
        loc.path.unlink(missing_ok=True)
        return
    client = s3_client()
    s3_call(url, lambda: client.delete_object(Bucket=loc.bucket, Key=loc.key), 3)


def list_files(url: str) -> Iterator[Listed]:
    """Every file under a folder or prefix, recursively, sorted by name. S3 listings
    are streamed page by page (S3 returns keys in order), whatever their length."""
    loc = parse(url)
    if not loc.is_s3:
        root = loc.path
        if not root.is_dir():
            raise FileNotFoundError(f"{url} is not a folder")
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        for name in files:
            yield Listed(name=name, url=str(root / name), size=(root / name).stat().st_size)
        return
    prefix = loc.key + "/" if loc.key else ""
    for page in s3_pages(url, prefix):
        yield from listed_in(url, prefix, page)


def s3_pages(url: str, prefix: str, delimiter: str = "") -> Iterator[dict]:
    """``ListObjectsV2`` pages (≤ 1,000 keys, in key order) under ``prefix`` of the
    bucket of ``url``, one at a time, each retried on its own."""
    client = s3_client()
    request = {"Bucket": parse(url).bucket, "Prefix": prefix}
    if delimiter:
        request["Delimiter"] = delimiter
    while True:
        page = s3_call(url, lambda: client.list_objects_v2(**request), 3)
        yield page
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def listed_in(url: str, root: str, page: dict) -> Iterator[Listed]:
    """The files of one listing page, named relative to the key prefix ``root``."""
    for obj in page.get("Contents", []):
        name = obj["Key"][len(root) :]
        if name and not name.endswith("/"):
            yield Listed(name=name, url=join(url, name), size=obj["Size"])


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _S3Stream:
    """A read-only stream over an S3 object that resumes with a ranged GET after a
    dropped connection (up to 3 times per read), so one network blip does not end an
    epoch."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._loc = parse(url)
        self._pos = 0
        self._body = self._open()

    def _open(self) -> Any:
        client = s3_client()
        extra = {"Range": f"bytes={self._pos}-"} if self._pos else {}
        return s3_call(
            self.url,
            lambda: client.get_object(Bucket=self._loc.bucket, Key=self._loc.key, **extra),
            3,
        )["Body"]

    def read(self, size: int = -1) -> bytes:
        from botocore import exceptions as bx
        from urllib3 import exceptions as ux

        for attempt in range(4):
            try:
                data = self._body.read(None if size is None or size < 0 else size)
                self._pos += len(data)
                return data
            except (bx.BotoCoreError, ux.HTTPError, ConnectionError):
                if attempt == 3:
                    raise
                time.sleep(0.5 * 2**attempt)
                self._body = self._open()
        raise AssertionError("unreachable")

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _S3Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
