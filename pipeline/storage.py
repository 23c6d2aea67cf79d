"""Where the pipeline's files live: a local path or an object-store URI, behind one small API.

A *location* is either a :class:`pathlib.Path` (a local file, as before) or an
:class:`ObjectUri` (``s3://bucket/key``).  Snapshots, partitions and manifests
are read and written through the functions below, so no other module asks
which kind it holds:

- **Writes are atomic either way.**  Locally: a temporary name, fsync, rename.
  On the object store: the complete bytes are built in memory and uploaded in
  one request (or one multipart upload), and an S3 object becomes visible only
  when its upload completes, so a reader never sees half an object; a crash
  before that leaves nothing (or an invisible, unfinished upload).
- **Reads** hand Polars and pyarrow the local path itself, or the whole object
  (one GET) as bytes.  Work too large for memory (freezing and partitioning a
  snapshot) runs in a local :func:`scratch_folder`: it downloads an object
  there first (:func:`local_file`) and moves finished files into place with
  :func:`publish_file` (a rename beside a local output, one streamed upload to
  an object store).
- **Failures are one line naming the URI and what to do**: a missing object or
  bucket on read is an :class:`ObjectNotFoundError` (a ``FileNotFoundError``,
  which callers already turn into their own "file not found" error); an
  unreachable endpoint, refused credentials, a missing bucket on write or any
  other failure of the store is a :class:`~pipeline.errors.StorageError`
  (exit code 2).

The object store is reached with pyarrow's own S3 client (``pyarrow.fs``): no
further dependency, and any S3-compatible server (MinIO, Ceph, moto, …) through
``endpoint_url``.  Credentials not given explicitly come from the AWS SDK's
default chain (environment, ``~/.aws``, instance metadata).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import ConfigError, StorageError

OBJECT_STORE_SCHEME = "s3"
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
ATTEMPTS_MAX = 3  # the AWS SDK's standard retry strategy: network errors and throttling are retried
ERROR_DETAIL_CHARS_MAX = 240
COPY_CHUNK_BYTES = 8 * 1024 * 1024  # downloads and uploads of files too large to hold in memory

_UNREACHABLE = (
    "NETWORK_CONNECTION",
    "curlCode",
    "Could not connect",
    "Couldn't connect",
    "Could not resolve",
    "Connection refused",
    "Connection timed out",
    "REQUEST_TIMEOUT",
)
_DENIED = (
    "ACCESS_DENIED",
    "AccessDenied",
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch",
    "EXPIRED_TOKEN",
    "ExpiredToken",
    "InvalidToken",
    "UNRECOGNIZED_CLIENT",
    "HTTP response code: 403",
    "code: 403",
)
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket")
_NO_KEY = ("NO_SUCH_KEY", "NoSuchKey", "Path does not exist")


@dataclass(frozen=True)
class ObjectStoreOptions:
    """How to reach the object store: endpoint, region and (optionally) explicit credentials."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def describe_endpoint(self) -> str:
        """The endpoint for messages."""
        return self.endpoint_url or "the AWS default endpoint"


@dataclass(frozen=True)
class ObjectUri:
    """``s3://bucket/key``, with the options to reach it (so derived locations and worker processes keep them)."""

    bucket: str
    key: str = ""
    options: ObjectStoreOptions = field(default_factory=ObjectStoreOptions, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{OBJECT_STORE_SCHEME}://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def __truediv__(self, name: str) -> ObjectUri:
        name = name.strip("/")
        return ObjectUri(self.bucket, f"{self.key}/{name}" if self.key else name, self.options)

    @property
    def name(self) -> str:
        """The last component of the key, like ``Path.name``."""
        return self.key.rpartition("/")[2]

    @property
    def parent(self) -> ObjectUri:
        """The key's prefix, like ``Path.parent``."""
        return ObjectUri(self.bucket, self.key.rpartition("/")[0], self.options)

    @property
    def suffixes(self) -> list[str]:
        """The name's suffixes, like ``Path.suffixes``."""
        return PurePosixPath(self.name).suffixes

    @property
    def arrow_path(self) -> str:
        """``bucket/key``, the path pyarrow's S3 filesystem takes."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket


Location: TypeAlias = Path | ObjectUri
Source: TypeAlias = str | bytes  # what read_source returns: a local path, or an object's whole content


class ObjectNotFoundError(FileNotFoundError):
    """A file or object that should exist does not; ``str()`` is the whole one-line message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "file not found"


def location(value: str | os.PathLike[str] | ObjectUri, options: ObjectStoreOptions | None = None) -> Location:
    """Parse a local path or an ``s3://bucket/key`` URI (``file://`` URIs are local paths)."""
    if isinstance(value, ObjectUri | Path):
        return value
    text = os.fspath(value)
    scheme, separator, rest = text.partition("://")
    if not separator:
        return Path(text)
    scheme = scheme.lower()
    if scheme == "file":
        return Path(urlsplit(text).path)
    if scheme != OBJECT_STORE_SCHEME:
        raise ConfigError(f"{text}: unsupported URI scheme {scheme!r}; use a local path or s3://bucket/key")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{text}: no bucket name; use s3://bucket/key")
    return ObjectUri(bucket, key.strip("/"), options or ObjectStoreOptions())


def options_of(where: Location) -> ObjectStoreOptions | None:
    """The object-store options a location carries (None for a local path)."""
    return where.options if isinstance(where, ObjectUri) else None


def check_endpoint_url(name: str, url: str) -> None:
    """Refuse an endpoint that is not ``http(s)://host[:port]`` (:class:`ConfigError`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ConfigError(f"{name}={url!r} must look like http://host:port or https://host (no path)")


# --------------------------------------------------------------------------- reading


def exists(where: Location) -> bool:
    """Whether a file (not a folder) exists there; :class:`StorageError` if the store cannot say."""
    if isinstance(where, Path):
        return where.is_file()
    try:
        info = _filesystem(where.options).get_file_info(where.arrow_path)
    except OSError as exc:
        raise _store_error(exc, where, "look up") from exc
    return bool(info.type == pafs.FileType.File)


def missing_message(where: Location) -> str:
    """``<where>: file not found`` and, on the object store, whether the bucket or only the key is missing."""
    if isinstance(where, Path):
        return f"{where}: file not found"
    try:
        bucket = _filesystem(where.options).get_file_info(where.bucket)
    except OSError as exc:
        raise _store_error(exc, where, "look up") from exc
    endpoint = where.options.describe_endpoint()
    if bucket.type == pafs.FileType.NotFound:
        return f"{where}: file not found (bucket {where.bucket!r} does not exist at {endpoint}); check the URI"
    return f"{where}: file not found (no object with this key in bucket {where.bucket!r} at {endpoint})"


def read_source(where: Location) -> Source:
    """What Polars and pyarrow should read: the local path as text, or the object's whole content."""
    if isinstance(where, Path):
        return str(where)
    return read_bytes(where)


def arrow_input(source: Source) -> Any:
    """A :func:`read_source` result in the form pyarrow readers take."""
    return source if isinstance(source, str) else pa.BufferReader(source)


def read_bytes(where: Location) -> bytes:
    """The whole file or object; :class:`ObjectNotFoundError` if it does not exist."""
    if isinstance(where, Path):
        try:
            return where.read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"{where}: file not found") from exc
    with _reading(where) as filesystem, filesystem.open_input_file(where.arrow_path) as handle:
        data = handle.read()
    return bytes(data)


@contextlib.contextmanager
def _reading(where: ObjectUri) -> Iterator[Any]:
    """The store's filesystem, with a missing object as ObjectNotFoundError and other failures as StorageError."""
    try:
        yield _filesystem(where.options)
    except FileNotFoundError as exc:
        raise ObjectNotFoundError(missing_message(where)) from exc
    except OSError as exc:
        if any(marker in str(exc) for marker in _NO_KEY + _NO_BUCKET):
            raise ObjectNotFoundError(missing_message(where)) from exc
        raise _store_error(exc, where, "read") from exc


def read_text(where: Location) -> str:
    """The whole file or object as UTF-8 text."""
    return read_bytes(where).decode("utf-8")


def file_names(folder: Location) -> set[str]:
    """Names of the files directly inside ``folder`` (empty if it does not exist)."""
    if isinstance(folder, Path):
        if not folder.is_dir():
            return set()
        return {entry.name for entry in os.scandir(folder) if entry.is_file()}
    selector = pafs.FileSelector(folder.arrow_path, allow_not_found=True, recursive=False)
    try:
        infos = _filesystem(folder.options).get_file_info(selector)
    except OSError as exc:
        if any(marker in str(exc) for marker in _NO_BUCKET):
            return set()
        raise _store_error(exc, folder, "list") from exc
    return {info.base_name for info in infos if info.type == pafs.FileType.File}


# --------------------------------------------------------------------------- writing


def makedirs(folder: Location) -> None:
    """Create a local folder and its parents; object stores have no folders, so nothing there."""
    if isinstance(folder, Path):
        folder.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_output(where: Location) -> Iterator[Any]:
    """A target for a pyarrow writer that becomes ``where`` only if the block succeeds.

    Locally a temporary path (fsynced and renamed on success); on the object
    store an in-memory buffer, uploaded whole on success and dropped otherwise.
    """
    if isinstance(where, Path):
        with replaced_atomically(where) as temporary:
            yield temporary
        return
    sink = pa.BufferOutputStream()
    yield sink
    _upload(where, sink.getvalue())


def write_bytes(where: Location, data: bytes) -> None:
    """Write ``data`` atomically (see :func:`atomic_output`)."""
    if isinstance(where, Path):
        with replaced_atomically(where) as temporary:
            temporary.write_bytes(data)
        return
    _upload(where, data)


def write_text(where: Location, text: str) -> None:
    """Write UTF-8 ``text`` atomically."""
    write_bytes(where, text.encode("utf-8"))


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary path to write; on success it is fsynced and renamed to ``path``, else removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def scratch_folder(near: Location | None, prefix: str) -> Iterator[Path]:
    """A local working folder, removed afterwards (also on failure).

    Beside ``near`` when that is a local folder (hidden, ``.prefix-<host>-<pid>-…``), so
    finished files reach their place by a rename on the same disk; in the system's temporary
    folder (``TMPDIR``) when ``near`` is None or on an object store.  A folder this host's
    killed process left behind is deleted the next time one is made in the same place.
    """
    parent = Path(tempfile.gettempdir())
    if isinstance(near, Path):
        near.mkdir(parents=True, exist_ok=True)
        parent = near
    owner = f".{prefix}-{socket.gethostname()}-"
    _remove_abandoned(parent, owner)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{owner}{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise StorageError(
            f"{parent}: cannot make a scratch folder there ({exc.strerror or exc}); "
            "free space or fix its permissions (a dry run or an s3:// home uses TMPDIR)"
        ) from exc
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_abandoned(parent: Path, owner: str) -> None:
    """Delete scratch folders this host left behind in ``parent`` when their process was killed."""
    for folder in parent.glob(f"{owner}*"):
        pid = folder.name[len(owner) :].partition("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def local_file(where: Location, scratch: Path) -> Path:
    """``where`` as a local file: itself, or the object downloaded into ``scratch`` in pieces."""
    if isinstance(where, Path):
        return where
    target = scratch / f"download-{where.name}"
    with (
        _reading(where) as filesystem,
        filesystem.open_input_stream(where.arrow_path) as source,
        open(target, "wb") as sink,
    ):
        shutil.copyfileobj(source, sink, COPY_CHUNK_BYTES)
    return target


def publish_file(finished: Path, where: Location) -> None:
    """Move a finished local file to ``where`` atomically (a rename, or one streamed upload)."""
    if isinstance(where, ObjectUri):
        filesystem = _filesystem(where.options)
        try:
            with open(finished, "rb") as source, filesystem.open_output_stream(where.arrow_path) as stream:
                shutil.copyfileobj(source, stream, COPY_CHUNK_BYTES)
        except OSError as exc:
            raise _store_error(exc, where, "write") from exc
        finished.unlink()
        return
    where.parent.mkdir(parents=True, exist_ok=True)
    _fsync(finished)
    try:
        os.replace(finished, where)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with replaced_atomically(where) as temporary:  # another disk: copy, then rename there
            shutil.copyfile(finished, temporary)
        finished.unlink()
        return
    _fsync_dir(where.parent)


def _upload(where: ObjectUri, data: Any) -> None:
    # One write of the complete content, then close: the object exists only once the upload
    # completes, so readers see the old object, or none, or the whole new one.
    filesystem = _filesystem(where.options)
    try:
        with filesystem.open_output_stream(where.arrow_path) as stream:
            stream.write(data)
    except OSError as exc:
        raise _store_error(exc, where, "write") from exc


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------- the S3 client


@functools.cache
def _filesystem(options: ObjectStoreOptions) -> Any:
    """One pyarrow S3 filesystem per set of options (thread-safe; reused for every request)."""
    kwargs: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS_MAX),
    }
    if options.endpoint_url:
        parts = urlsplit(options.endpoint_url)
        kwargs["scheme"] = parts.scheme or "https"
        kwargs["endpoint_override"] = parts.netloc or options.endpoint_url
    if options.region:
        kwargs["region"] = options.region
    if options.access_key and options.secret_key:
        kwargs["access_key"] = options.access_key
        kwargs["secret_key"] = options.secret_key
        if options.session_token:
            kwargs["session_token"] = options.session_token
    return pafs.S3FileSystem(**kwargs)


def _store_error(exc: OSError, where: ObjectUri, doing: str) -> StorageError:
    """One line naming the URI, what went wrong and what to do."""
    text = " ".join(str(exc).split())
    start = text.find("AWS Error")
    detail = (text[start:] if start >= 0 else text)[:ERROR_DETAIL_CHARS_MAX]
    endpoint = where.options.describe_endpoint()
    if any(marker in text for marker in _UNREACHABLE):
        return StorageError(
            f"{where}: cannot reach the object store at {endpoint} ({detail}); check ENTITLE_S3_ENDPOINT_URL "
            "(or AWS_ENDPOINT_URL) and that the server is running"
        )
    if any(marker in text for marker in _DENIED):
        return StorageError(
            f"{where}: the object store at {endpoint} denied access ({detail}); check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) and the bucket's policy"
        )
    if any(marker in text for marker in _NO_BUCKET):
        return StorageError(
            f"{where}: bucket {where.bucket!r} does not exist at {endpoint}; create it, or point "
            "ENTITLE_DATA_URI at an existing bucket"
        )
    return StorageError(
        f"{where}: the object store at {endpoint} failed to {doing} it ({detail}); retry, or check the "
        "endpoint, the credentials and the URI"
    )
