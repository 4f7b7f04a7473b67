"""Where bulk scoring and the dataset shards live: a local folder or an s3:// prefix on the configured
endpoint, both through one pyarrow filesystem so Ray tasks on any node read and write the same way.

Writes are atomic for readers: a local file is written under a hidden temporary name and renamed;
an S3 object appears only when its upload completes.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from plantad.config import S3Config
from plantad.tracking.s3 import check_bucket, pyarrow_filesystem, split_s3_uri

TMP_PREFIX = ".tmp-"  # hidden temporary files of local atomic writes


@dataclass(frozen=True)
class Location:
    """A folder: its filesystem, its path on that filesystem and how messages name it."""

    fs: pafs.FileSystem
    base: str  # 'bucket/prefix' on S3, an absolute path locally
    uri: str  # 's3://bucket/prefix' or the absolute local path

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def path(self, rel: str) -> str:
        """Filesystem path of `rel` (posix, relative to the folder)."""
        return posixpath.join(self.base, rel) if rel else self.base

    def display(self, rel: str) -> str:
        return posixpath.join(self.uri, rel) if self.is_s3 else str(Path(self.uri) / rel)

    def child(self, rel: str) -> Location:
        return Location(self.fs, self.path(rel), self.display(rel))


def open_location(uri: str, s3: S3Config) -> Location:
    """A local folder or s3://bucket/prefix; for S3 the bucket is checked now (fails in seconds)."""
    if urlsplit(uri).scheme == "s3":
        bucket, prefix = split_s3_uri(uri)
        check_bucket(s3, bucket)
        base = f"{bucket}/{prefix}" if prefix else bucket
        return Location(pyarrow_filesystem(s3), base, f"s3://{base}")
    path = str(Path(uri).expanduser().resolve())
    return Location(pafs.LocalFileSystem(), path, path)


def list_images(loc: Location, extensions: list[str]) -> list[str]:
    """Sorted paths relative to `loc` of every file under it (recursively) with one of `extensions`.

    A missing folder, or one without images, is an error naming the location and the extensions.
    """
    wanted = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not loc.is_s3 and not Path(loc.base).is_dir():
        raise FileNotFoundError(f"input folder {loc.uri} does not exist (bulk scoring --input)")
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.base, recursive=True, allow_not_found=True))
    prefix = loc.base.rstrip("/") + "/"
    found = sorted(
        info.path[len(prefix):] for info in infos
        if info.type == pafs.FileType.File and info.path.lower().endswith(wanted)
        and not posixpath.basename(info.path).startswith(".")
    )
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(wanted)}; setting bulk.extensions) under {loc.uri}")
    return found


def read_bytes(loc: Location, rel: str) -> bytes:
    with loc.fs.open_input_stream(loc.path(rel)) as stream:
        return stream.readall()


def write_atomic(loc: Location, rel: str, data: bytes) -> None:
    """Write `rel` so that readers see the whole file or nothing (also under SIGKILL)."""
    target = loc.path(rel)
    if loc.is_s3:  # an object is visible only once its upload has completed; S3 needs no folders
        with loc.fs.open_output_stream(target) as out:
            out.write(data)
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
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path(rel), recursive=False, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)


def exists(loc: Location, rel: str) -> bool:
    return loc.fs.get_file_info(loc.path(rel)).type == pafs.FileType.File


def delete(loc: Location, rel: str) -> None:
    loc.fs.delete_file(loc.path(rel))
