"""Where packed datasets live: a local (or shared) folder, or an S3-compatible bucket through fsspec's s3fs, with
credentials and endpoint from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL; AWS_DEFAULT_REGION), so MinIO, moto, Ceph or AWS itself all work.

Every store failure becomes a DataError naming the cause and the fix. Time is bounded: connections time out after
CONNECT_TIMEOUT s and replies after READ_TIMEOUT s, botocore does not retry on its own, s3fs tries twice, and once an
endpoint has failed to answer, later calls of the same store fail at once rather than wait again: an endpoint that
refuses connections or never answers is an error within about a minute, not boto's minutes of retries."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fcclass.errors import DataError
from fcclass.files import atomic_write_bytes, os_error_reason

CONNECT_TIMEOUT = 5
READ_TIMEOUT = 15


class EndpointDown(DataError):
    """The S3 endpoint could not be reached or did not answer (a run of a cached version goes on without it)."""


def is_remote(dest: str) -> bool:
    return dest.startswith("s3://")


def open_store(dest: str) -> "FolderStore | S3Store":
    """The store at ``dest``: ``s3://bucket/prefix`` or a folder (made absolute)."""
    if is_remote(dest):
        return S3Store(dest)
    if "://" in dest:
        raise DataError(f"'{dest}': only folders and s3://bucket/prefix are supported as a packed dataset's place. "
                        "Give a local or shared folder, or an s3:// URL (other S3-compatible stores through AWS_ENDPOINT_URL).")
    return FolderStore(dest)


class FolderStore:
    """A packed dataset in a folder: files written atomically (temp file, fsync, rename)."""

    def __init__(self, dest: str) -> None:
        self.root = Path(os.path.abspath(Path(dest).expanduser()))  # normalised: no '..' in what runs record
        self.url = str(self.root)

    def where(self, key: str) -> str:
        return str(self.root / key)

    def _path(self, key: str) -> Path:
        return self.root / key

    @property
    def unreachable(self) -> bool:
        """The folder is not there at all (a share not mounted, a disk not attached)."""
        return not self.root.exists()

    def check_place(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise DataError(f"'{self.root}' is a file, not a folder: a packed dataset is a folder. Give another --out.")

    def read(self, key: str, limit: int | None = None) -> bytes:
        path = self._path(key)
        try:
            if limit is not None and path.stat().st_size > limit:
                raise DataError(f"'{path}' is {path.stat().st_size:,} bytes, over the {limit:,} a packed dataset's file may have: "
                                "it is not one fcclass wrote. Remove it, or pack again into a new folder.")
            return path.read_bytes()
        except FileNotFoundError:
            raise
        except IsADirectoryError:
            raise DataError(f"'{path}' is a folder where fcclass expects a file. Remove it, or pack into a new folder.") from None
        except OSError as e:
            raise DataError(f"Cannot read '{path}': {os_error_reason(e)}.") from None

    def size(self, key: str) -> int | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DataError(f"Cannot read '{self._path(key)}': {os_error_reason(e)}.") from None
        return st.st_size

    def write(self, key: str, data: bytes) -> None:
        try:
            self._path(key).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self._path(key), data)
        except OSError as e:
            raise DataError(f"Cannot write '{self._path(key)}': {os_error_reason(e)}. Free some space or give another --out; "
                            "what was packed before is intact, and packing again resumes.") from None

    def list(self, prefix: str = "") -> list[str]:
        """Keys (paths relative to the root, '/'-separated) under ``prefix``; files only, temp files left out."""
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, _, names in os.walk(base):
            for name in names:
                if not name.startswith("."):
                    out.append((Path(dirpath) / name).relative_to(self.root).as_posix())
        return sorted(out)


class S3Store:
    """A packed dataset under s3://bucket/prefix, through s3fs (one PUT per object: atomic)."""

    def __init__(self, dest: str) -> None:
        rest = dest[len("s3://"):].rstrip("/")
        if not rest or rest.startswith("/"):
            raise DataError(f"'{dest}' names no bucket. Give s3://BUCKET or s3://BUCKET/PREFIX.")
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/")
        self.url = f"s3://{rest}"
        self._fs: Any = None
        self._down: str | None = None  # why the endpoint did not answer: later calls fail at once

    @property
    def fs(self) -> Any:
        if self._fs is None:
            try:
                import s3fs
            except ImportError:
                raise DataError("s3:// places need s3fs: pip install 'fcclass[shards]'.") from None
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or None
            fs = s3fs.S3FileSystem(
                anon=False, endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False,
                config_kwargs={"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT,
                               "retries": {"total_max_attempts": 1, "mode": "standard"}})
            fs.retries = 2  # s3fs's own retries (a class attribute, 5); a constructor kwarg would go to aiobotocore's session
            self._fs = fs
        return self._fs

    def where(self, key: str) -> str:
        return f"{self.url}/{key}"

    @property
    def unreachable(self) -> bool:
        """The endpoint did not answer (refused, timed out)."""
        return self._down is not None

    def _path(self, key: str) -> str:
        return "/".join(p for p in (self.bucket, self.prefix, key) if p)

    def check_place(self) -> None:
        self._call(lambda: self.fs.ls(self.bucket, refresh=True), self.bucket)

    def read(self, key: str, limit: int | None = None) -> bytes:
        if limit is not None:
            size = self.size(key)
            if size is None:
                raise FileNotFoundError(key)
            if size > limit:
                raise DataError(f"'{self.where(key)}' is {size:,} bytes, over the {limit:,} a packed dataset's file may have: it is "
                                "not one fcclass wrote. Remove it, or pack again under a new prefix.")
        return self._call(lambda: self.fs.cat_file(self._path(key)), key)

    def size(self, key: str) -> int | None:
        try:
            return int(self._call(lambda: self.fs.info(self._path(key)), key)["size"])
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        self._call(lambda: self.fs.pipe_file(self._path(key), data), key)

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        try:
            found = self._call(lambda: self.fs.find(base), prefix or self.url)
        except FileNotFoundError:
            return []
        start = len(self._path("")) + 1  # "bucket/prefix/" or "bucket/"
        return sorted(p[start:] for p in found if not p[start:].rsplit("/", 1)[-1].startswith("."))

    def _call(self, fn: Any, what: str) -> Any:
        if self._down is not None:
            raise EndpointDown(self._down)
        try:
            return fn()
        except FileNotFoundError as e:
            if self._bucket_missing(e):
                raise DataError(f"The bucket '{self.bucket}' does not exist at {self._endpoint()}. Create it (e.g. `aws s3 mb "
                                f"s3://{self.bucket}`), or check the bucket name and AWS_ENDPOINT_URL.") from None
            raise
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore, aiohttp and s3fs raise many types for one cause
            why = self._explain(e, what)
            raise (EndpointDown(why) if self._down is not None else DataError(why)) from None

    def _bucket_missing(self, e: BaseException) -> bool:
        text = f"{e!r} {getattr(e, '__cause__', '')!r}"
        return "NoSuchBucket" in text or "bucket does not exist" in text.lower()

    def _endpoint(self) -> str:
        return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "AWS S3 (no AWS_ENDPOINT_URL set)"

    def _explain(self, e: BaseException, what: str) -> str:
        text = f"{type(e).__name__}: {e} {getattr(e, '__cause__', '')!r}"
        low = text.lower()
        where = self._endpoint()
        if "NoCredentials" in text or "Unable to locate credentials" in text:
            return ("No S3 credentials were found for s3://" + self.bucket + ". Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "(or an AWS profile) to a key that may read and write that bucket.")
        if any(k in text for k in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403")) \
                or isinstance(e, PermissionError):
            return (f"{where} refused the credentials for s3://{self.bucket} ({_short(e)}). Set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY to a key that may read and write that bucket.")
        if "NoSuchBucket" in text:
            return (f"The bucket '{self.bucket}' does not exist at {where}. Create it, or check the bucket name and AWS_ENDPOINT_URL.")
        if any(k in low for k in ("timeout", "timed out", "connect", "endpoint", "refused", "unreachable", "name or service")):
            unreachable = any(k in low for k in ("could not connect", "refused", "unreachable", "name or service"))
            how = ("could not be reached (nothing accepted the connection)" if unreachable else
                   f"did not answer (fcclass gave up after {CONNECT_TIMEOUT} s to connect and {READ_TIMEOUT} s for a reply, twice)")
            self._down = (f"The S3 endpoint {where} {how} (for {what}): {_short(e)}. Check that the server runs "
                          "and AWS_ENDPOINT_URL points at it; runs of a version already in the local cache train without it.")
            return self._down
        return f"S3 request for {what} at {where} failed: {_short(e)}. Check the bucket, the credentials and AWS_ENDPOINT_URL."


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
