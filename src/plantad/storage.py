"""Where bulk scoring and the dataset shards live: a local folder or an s3:// prefix on the configured
endpoint, both through one pyarrow filesystem so Ray tasks on any node read and write the same way.

Writes are atomic for readers: a local file is written under a hidden temporary name and renamed;
an S3 object appears only when its upload completes. S3 reads and writes are retried: pyarrow's
client gives up on a dropped connection at once, and a transient fault must not become an image's
`error` row in a committed part (chaos bench). One that persists raises StorageError naming the
endpoint and the object, so the part stays uncommitted and a re-run resumes it.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from plantad.config import S3Config
from plantad.tracking.s3 import StorageError, check_bucket, endpoint_name, pyarrow_filesystem, split_s3_uri

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"  # hidden temporary files of local atomic writes
S3_ATTEMPTS = 4  # per S3 call; waits 0.5, 1 and 2 s between them
T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A folder: its filesystem, its path on that filesystem and how messages name it."""

    fs: pafs.FileSystem
    base: str  # 'bucket/prefix' on S3, an absolute path locally
    uri: str  # 's3://bucket/prefix' or the absolute local path
    endpoint: str = ""  # how errors name the S3 endpoint (empty locally)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def path(self, rel: str) -> str:
        """Filesystem path of `rel` (posix, relative to the folder)."""
        return posixpath.join(self.base, rel) if rel else self.base

    def display(self, rel: str) -> str:
        return posixpath.join(self.uri, rel) if self.is_s3 else str(Path(self.uri) / rel)

    def child(self, rel: str) -> Location:
        return Location(self.fs, self.path(rel), self.display(rel), self.endpoint)


def open_location(uri: str, s3: S3Config) -> Location:
    """A local folder or s3://bucket/prefix; for S3 the bucket is checked now (fails in seconds)."""
    if urlsplit(uri).scheme == "s3":
        bucket, prefix = split_s3_uri(uri)
        check_bucket(s3, bucket)
        base = f"{bucket}/{prefix}" if prefix else bucket
        return Location(pyarrow_filesystem(s3), base, f"s3://{base}", endpoint_name(s3))
    path = str(Path(uri).expanduser().resolve())
    return Location(pafs.LocalFileSystem(), path, path)


def list_images(loc: Location, extensions: list[str]) -> list[str]:
    """Sorted paths relative to `loc` of every file under it (recursively) with one of `extensions`.

    A missing folder, or one without images, is an error naming the location and the extensions.
    """
    return sorted(list_image_sizes(loc, extensions))


def list_image_sizes(loc: Location, extensions: list[str]) -> dict[str, int]:
    """list_images with each file's size in bytes from the same listing (so a reader can refuse an
    oversized file without opening it); keys as the store names them, relative to `loc`."""
    wanted = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not loc.is_s3 and not Path(loc.base).is_dir():
        raise FileNotFoundError(f"input folder {loc.uri} does not exist (bulk scoring --input)")
    infos = _retried(loc, "", "list", lambda: loc.fs.get_file_info(
        pafs.FileSelector(loc.base, recursive=True, allow_not_found=True)))
    prefix = loc.base.rstrip("/") + "/"
    found = {
        info.path[len(prefix):]: info.size for info in infos
        if info.type == pafs.FileType.File and info.path.lower().endswith(wanted)
        and not posixpath.basename(info.path).startswith(".")
    }
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(wanted)}; setting bulk.extensions) under {loc.uri}")
    return dict(sorted(found.items()))


def _retried(loc: Location, rel: str, what: str, action: Callable[[], T]) -> T:
    """`action`, on S3 again after a failure; a missing object is not retried (FileNotFoundError)."""
    if not loc.is_s3:
        return action()
    for attempt in range(S3_ATTEMPTS):
        try:
            return action()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if attempt == S3_ATTEMPTS - 1:
                raise StorageError(f"cannot {what} {loc.display(rel)} at S3 endpoint {loc.endpoint} after "
                                   f"{S3_ATTEMPTS} attempts: {exc}; re-run the same command to resume") from exc
            log.warning("%s %s failed (%s), retrying", what, loc.display(rel), exc)
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def read_bytes(loc: Location, rel: str, limit: int | None = None) -> bytes:
    """The object's bytes; with `limit`, at most limit + 1 of them (enough to tell it is over)."""
    def read() -> bytes:
        with loc.fs.open_input_stream(loc.path(rel)) as stream:
            return stream.readall() if limit is None else stream.read(limit + 1)

    return _retried(loc, rel, "read", read)


def write_atomic(loc: Location, rel: str, data: bytes) -> None:
    """Write `rel` so that readers see the whole file or nothing (also under SIGKILL)."""
    target = loc.path(rel)
    if loc.is_s3:  # an object is visible only once its upload has completed; S3 needs no folders
        def upload() -> None:
            with loc.fs.open_output_stream(target) as out:
                out.write(data)

        _retried(loc, rel, "write", upload)
        return
    os.makedirs(posixpath.dirname(target), exist_ok=True)
    tmp = posixpath.join(posixpath.dirname(target), f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(target)}")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def list_names(loc: Location, rel: str) -> list[str]:
    """Names of the files directly in folder `rel` (none when it does not exist)."""
    infos = _retried(loc, rel, "list", lambda: loc.fs.get_file_info(
        pafs.FileSelector(loc.path(rel), recursive=False, allow_not_found=True)))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)


def exists(loc: Location, rel: str) -> bool:
    return _retried(loc, rel, "look up", lambda: loc.fs.get_file_info(loc.path(rel))).type == pafs.FileType.File


def delete(loc: Location, rel: str) -> None:
    """Remove `rel`; one already gone (a retried delete whose first answer was lost) is fine."""
    try:
        _retried(loc, rel, "delete", lambda: loc.fs.delete_file(loc.path(rel)))
    except FileNotFoundError:
        pass
