"""The dataset as Parquet shards: every manifest row with its image (and mask) bytes, so that Ray
workers on any node read training images from a local folder or S3, never from the driver's disk.

A shard set lives in `<location>/<manifest fingerprint>/`: part files first, then `_shards.json`,
the commit, which lists the parts and records the fingerprint. A set is only used for the manifest
whose fingerprint it records (the DVC data version), and each image's bytes are checked against the
manifest's sha256 when written and again where they are decoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from plantad.config import S3Config
from plantad.data.images import ImageDecodeError, read_image_bytes
from plantad.data.manifest import coerce_manifest, manifest_fingerprint
from plantad.storage import Location, exists, open_location, read_bytes, write_atomic

log = logging.getLogger(__name__)

INDEX = "_shards.json"
FORMAT_VERSION = 1
IMAGE_COLUMN = "image"  # encoded image bytes as stored (PNG, JPEG, ...); null when unreadable at scan
MASK_COLUMN = "mask"  # encoded mask bytes; null without a mask
ROW_GROUP_BYTES = 32_000_000  # row groups a reader can fetch without a whole shard


class ShardError(ValueError):
    """A shard set that is missing, incomplete, or written for another manifest (data version)."""


@dataclass(frozen=True)
class ShardPart:
    name: str
    rows: int
    bytes: int  # size of the Parquet file


@dataclass(frozen=True)
class ShardSet:
    """A committed shard set: where it is and which manifest (by fingerprint) it holds."""

    location: str  # as configured: a local folder or s3://bucket/prefix
    fingerprint: str
    parts: tuple[ShardPart, ...]
    max_bytes: int

    @property
    def folder(self) -> str:
        return posixpath.join(self.location, self.fingerprint) if self.location.startswith("s3://") \
            else str(Path(self.location) / self.fingerprint)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def as_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "location": self.location, "fingerprint": self.fingerprint,
                "rows": self.rows, "max_bytes": self.max_bytes,
                "parts": [{"name": p.name, "rows": p.rows, "bytes": p.bytes} for p in self.parts]}

    @classmethod
    def from_dict(cls, d: dict[str, Any], location: str, source: str) -> ShardSet:
        try:
            parts = tuple(ShardPart(str(p["name"]), int(p["rows"]), int(p["bytes"])) for p in d["parts"])
            return cls(location, str(d["fingerprint"]), parts, int(d["max_bytes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{source} is not a shard index written by the prepare stage ({exc!r})") from exc


def shard_schema() -> pa.Schema:
    from plantad.data.manifest import MANIFEST_DTYPES

    arrow = {"str": pa.string(), "int64": pa.int64(), "Int64": pa.int64(), "float64": pa.float64()}
    fields = [pa.field(name, arrow[dtype]) for name, dtype in MANIFEST_DTYPES.items()]
    return pa.schema([*fields, pa.field(IMAGE_COLUMN, pa.binary()), pa.field(MASK_COLUMN, pa.binary())])


def require_match(shards: ShardSet, manifest: pd.DataFrame, source: str) -> None:
    """Refuse shards written for another manifest: they would hold another data version."""
    expected = manifest_fingerprint(manifest)
    if shards.fingerprint != expected:
        raise ShardError(f"shard set {source} holds manifest fingerprint {shards.fingerprint}, but the manifest's "
                         f"fingerprint is {expected}: they are different data versions. Re-run the prepare "
                         "stage (`dvc repro prepare`) to write the shards of this manifest")


def read_shard_record(path: Path) -> ShardSet:
    """The shard set the prepare stage recorded in `path` (its location and fingerprint)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"cannot read the shard record {path} ({exc}); run the prepare stage") from exc
    if not isinstance(doc, dict) or "location" not in doc:
        raise ShardError(f"{path} is not the shard record written by the prepare stage (no 'location')")
    return ShardSet.from_dict(doc, str(doc["location"]), str(path))


def _read_index(loc: Location) -> dict[str, Any] | None:
    if not exists(loc, INDEX):
        return None
    try:
        return json.loads(read_bytes(loc, INDEX))
    except json.JSONDecodeError as exc:
        raise ShardError(f"{loc.display(INDEX)} is not JSON ({exc}); delete the folder and re-run prepare") from exc


def _check_parts(shards: ShardSet, loc: Location) -> None:
    for part in shards.parts:
        info = loc.fs.get_file_info(loc.path(part.name))
        if info.type != pafs.FileType.File or info.size != part.bytes:
            found = "missing" if info.type != pafs.FileType.File else f"{info.size} bytes"
            raise ShardError(f"shard {loc.display(part.name)} is {found}, its index records {part.bytes} bytes; "
                             "delete the set's folder and re-run the prepare stage")


def open_shards(location: str, manifest: pd.DataFrame, s3: S3Config) -> ShardSet:
    """The committed shard set of `manifest` under `location`, its parts checked present and whole."""
    fingerprint = manifest_fingerprint(manifest)
    loc = open_location(location, s3)
    index = _read_index(loc.child(fingerprint))
    if index is None:
        raise ShardError(f"no shard set for manifest fingerprint {fingerprint} under {loc.uri} (no "
                         f"{fingerprint}/{INDEX}); run the prepare stage with data.shards.location: {location}")
    shards = ShardSet.from_dict(index, location, loc.child(fingerprint).display(INDEX))
    require_match(shards, manifest, loc.child(fingerprint).uri)
    _check_parts(shards, loc.child(fingerprint))
    return shards


def shard_location(shards: ShardSet, s3: S3Config) -> Location:
    """The set's folder as a pyarrow filesystem and base path (S3 bucket checked now)."""
    return open_location(shards.folder, s3)


def write_shards(manifest: pd.DataFrame, root: Path, location: str, s3: S3Config, max_bytes: int) -> ShardSet:
    """Write the manifest's rows with their bytes under `location`, unless that version is there already."""
    manifest = coerce_manifest(manifest, "manifest to shard")
    fingerprint = manifest_fingerprint(manifest)
    loc = open_location(location, s3).child(fingerprint)
    index = _read_index(loc)
    if index is not None:
        shards = ShardSet.from_dict(index, location, loc.display(INDEX))
        require_match(shards, manifest, loc.uri)
        _check_parts(shards, loc)
        log.info("shard set %s already holds this manifest (%d parts); reused", loc.uri, len(shards.parts))
        return shards
    if not loc.is_s3:
        loc.fs.create_dir(loc.base, recursive=True)
    parts = _write_parts(manifest, Path(root), loc, max_bytes)
    shards = ShardSet(location, fingerprint, tuple(parts), max_bytes)
    index_doc = {k: v for k, v in shards.as_dict().items() if k != "location"}
    write_atomic(loc, INDEX, json.dumps(index_doc, indent=2).encode())  # the commit: the set exists from now on
    return shards


def _row_bytes(row: pd.Series, root: Path) -> tuple[bytes | None, bytes | None]:
    """(image, mask) bytes of a manifest row; the image must still be the file the manifest hashed."""
    image = None
    if not pd.isna(row["sha256"]):
        image = read_image_bytes(root / row["path"])
        if hashlib.sha256(image).hexdigest() != row["sha256"]:
            raise ShardError(f"{root / row['path']} changed since the manifest was written (its sha256 differs); "
                             "re-run the prepare stage")
    mask = None if pd.isna(row["mask_path"]) else read_image_bytes(root / row["mask_path"])
    return image, mask


def _write_parts(manifest: pd.DataFrame, root: Path, loc: Location, max_bytes: int) -> list[ShardPart]:
    schema, parts, pending, size = shard_schema(), [], [], 0
    group_bytes = min(max_bytes, ROW_GROUP_BYTES)

    def flush() -> None:
        if pending:
            name = f"part-{len(parts):05d}.parquet"
            parts.append(_write_part(pending, schema, loc, name, group_bytes))
            pending.clear()

    for _, row in manifest.iterrows():
        try:
            image, mask = _row_bytes(row, root)
        except ImageDecodeError as exc:
            raise ShardError(f"cannot shard {exc.source}: {exc.reason}; re-run the prepare stage") from exc
        row_size = len(image or b"") + len(mask or b"")
        if pending and size + row_size > max_bytes:
            flush()
            size = 0
        pending.append({**row.to_dict(), IMAGE_COLUMN: image, MASK_COLUMN: mask})
        size += row_size
    flush()
    return parts


def _write_part(rows: list[dict[str, Any]], schema: pa.Schema, loc: Location, name: str, group_bytes: int) -> ShardPart:
    frame = pd.DataFrame(rows)
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    compression = {c: ("NONE" if c in (IMAGE_COLUMN, MASK_COLUMN) else "SNAPPY") for c in schema.names}
    with loc.fs.open_output_stream(loc.path(name)) as out:  # S3: the object appears when complete
        pq.write_table(table, out, row_group_size=max(1, group_bytes // per_row), compression=compression)
    size = loc.fs.get_file_info(loc.path(name)).size
    return ShardPart(name, table.num_rows, int(size))


def read_shard_images(shards: ShardSet, s3: S3Config, paths: list[str]) -> dict[str, bytes]:
    """{path: image bytes} of the given manifest paths, read from the shards (hash-checked)."""
    import pyarrow.dataset as pads

    loc = shard_location(shards, s3)
    dataset = pads.dataset([loc.path(p.name) for p in shards.parts], format="parquet", filesystem=loc.fs)
    table = dataset.to_table(columns=["path", "sha256", IMAGE_COLUMN], filter=pads.field("path").isin(paths))
    found = {}
    for path, sha, data in zip(*(table.column(c).to_pylist() for c in ("path", "sha256", IMAGE_COLUMN))):
        found[path] = verified_image(path, sha, data, shards.folder)
    missing = sorted(set(paths) - set(found))
    if missing:
        raise ShardError(f"shard set {shards.folder} lacks {len(missing)} image(s) of the manifest: {missing[:5]}")
    return found


def verified_image(path: str, sha256: str | None, data: bytes | None, folder: str) -> bytes:
    """A row's image bytes when they are the ones the manifest hashed; else an error naming both."""
    if data is None:
        raise ShardError(f"{path} has no image bytes in shard set {folder} (it was unreadable when scanned)")
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ShardError(f"image {path} in shard set {folder} has sha256 {actual}, the manifest records {sha256}: "
                         "the shard was changed after it was written; re-run the prepare stage")
    return data
