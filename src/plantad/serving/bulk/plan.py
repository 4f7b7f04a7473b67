"""The deterministic plan that makes bulk scoring resumable with exactly one row per image.

The driver lists the inputs (sorted) and cuts them into fixed parts; a part's file name holds its
index, a hash of its paths and a hash of the table's identity (model, runtime, device, size limits,
maps), so the same inputs scored the same way always give the same names, and a run with other
settings never reuses a part of another. A part is done iff its file exists (written atomically),
and a re-run scores only the parts whose file is missing. Each model version writes under its own
folder, `<output>/<model id>/`, so versions never mix. `manifest.json` lists the parts that make up
the table; it is replaced only once a run's parts are all committed, and parts it does not list
are deleted only after that, so it never names a missing file.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from plantad.config import BulkConfig
from plantad.models.checkpoint import MODEL_FILE
from plantad.storage import Location, exists, list_names, read_bytes, write_atomic
from plantad.tracking.model_source import ModelRef, registered_sha256

PARTS = "parts"
MANIFEST = "manifest.json"
_PART_FILE = re.compile(r"^part-\d{5,}-[0-9a-f]{8}-[0-9a-f]{8}\.parquet$")

SCHEMA = pa.schema([
    ("path", pa.string()), ("relpath", pa.string()), ("sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()),
    ("probability", pa.float64()), ("is_anomalous", pa.bool_()),
    ("p_local", pa.float64()), ("p_semantic", pa.float64()),
    ("local_score", pa.float64()), ("semantic_score", pa.float64()), ("threshold", pa.float64()),
    ("error", pa.string()), ("map_path", pa.string()),
    ("model_id", pa.string()), ("model_name", pa.string()), ("model_version", pa.string()),
    ("model_alias", pa.string()), ("model_uri", pa.string()), ("teacher", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
])


@dataclass(frozen=True)
class Part:
    index: int
    relpaths: tuple[str, ...]
    identity: str = "00000000"  # identity_digest of the table's settings

    @property
    def file(self) -> str:
        digest = hashlib.sha256("\n".join(self.relpaths).encode()).hexdigest()[:8]
        return f"part-{self.index:05d}-{digest}-{self.identity}.parquet"


@dataclass(frozen=True)
class Entry:
    """One listed input: the key to read it by, its size from the listing, and why it is refused."""

    key: str
    size: int
    refused: str | None = None


def plan_parts(relpaths: list[str], part_size: int, identity: str = "00000000") -> list[Part]:
    """Sorted inputs cut into parts of `part_size` (the last one shorter)."""
    ordered = sorted(relpaths)
    return [Part(i // part_size, tuple(ordered[i:i + part_size]), identity)
            for i in range(0, len(ordered), part_size)]


def listing_entries(sizes: dict[str, int]) -> dict[str, Entry]:
    """Relative path (normalised: no `//`, `./`) -> entry, from the listing's keys and sizes.

    A key that is absolute or climbs out with `..`, or that normalises to another key's path, keeps
    its own name as its path and is refused (an error row, never read, no heatmap written for it)."""
    entries: dict[str, Entry] = {}
    # keys already in normal form claim their path first, so a sloppy duplicate never displaces one
    for key in sorted(sizes, key=lambda k: (posixpath.normpath(k) != k, k)):
        rel = posixpath.normpath(key)
        if key.startswith("/") or rel == ".." or rel.startswith("../"):
            entries[key] = Entry(key, sizes[key], f"key {key!r} leaves the input folder ('..' or absolute); refused")
        elif rel in entries:
            entries[key] = Entry(key, sizes[key], f"key {key!r} names the same path as {entries[rel].key!r} "
                                                  "once normalised; refused")
        else:
            entries[rel] = Entry(key, sizes[key])
    return dict(sorted(entries.items()))


def model_sha256(ref: ModelRef) -> str | None:
    """sha256 of model.pt: a model directory's, hashed here; a registered version's `model_sha256`
    tag (the download is checked against it); None for a version registered without the tag."""
    if ref.registered:
        return registered_sha256(ref)
    assert ref.local_dir is not None
    digest = hashlib.sha256()
    with open(Path(ref.local_dir) / MODEL_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_id(ref: ModelRef, sha256: str | None = None) -> str:
    """The output folder name of one model: `<name>-v<version>`, or `<folder>-<sha256[:12] of model.pt>`."""
    if ref.registered:
        return re.sub(r"[^A-Za-z0-9._-]", "_", f"{ref.name}-v{ref.version}")
    assert ref.local_dir is not None
    digest = sha256 or model_sha256(ref)
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{Path(ref.local_dir).name}-{digest[:12]}")


def table_identity(ref: ModelRef, sha256: str | None, bulk: BulkConfig, maps: str | None) -> dict[str, Any]:
    """Everything that changes a table's rows besides the inputs. Precision follows from the model
    (its train.amp / scoring.cpu_amp) and the device; a registry version by its run and model.pt sha256."""
    return {"model": ref.version_uri, "model_run_id": ref.run_id, "model_sha256": sha256,
            "runtime": bulk.runtime, "device": bulk.device, "max_image_bytes": bulk.max_image_bytes,
            "max_image_pixels": bulk.max_image_pixels, "maps": maps}


def identity_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def done_parts(out: Location) -> set[str]:
    """File names of the committed parts in `out/parts/`."""
    return {n for n in list_names(out, PARTS) if _PART_FILE.match(n)}


def part_bytes(rows: pd.DataFrame) -> bytes:
    """One part as Parquet bytes, rows sorted by path, columns and types of SCHEMA."""
    table = pa.Table.from_pandas(rows.sort_values("relpath")[SCHEMA.names], schema=SCHEMA, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def commit_part(out: Location, part: Part, rows: pd.DataFrame) -> None:
    got = sorted(rows["relpath"])
    if got != list(part.relpaths):
        raise RuntimeError(f"part {part.file} of {out.uri} got rows for {len(got)} images, "
                           f"expected exactly its {len(part.relpaths)}")
    write_atomic(out, f"{PARTS}/{part.file}", part_bytes(rows))


def read_part(out: Location, name: str) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(out, f"{PARTS}/{name}")), schema=SCHEMA)


def write_manifest(out: Location, parts: list[Part], info: dict[str, Any]) -> None:
    body = {**info, "parts": [{"file": f"{PARTS}/{p.file}", "rows": len(p.relpaths)} for p in parts]}
    write_atomic(out, MANIFEST, json.dumps(body, indent=2, default=str).encode())


def finished_manifest(out: Location) -> dict[str, Any]:
    """The manifest of the finished table in `out` (its input, identity, parts); {} when there is none."""
    if not exists(out, MANIFEST):
        return {}
    return json.loads(read_bytes(out, MANIFEST))


def read_results(out: Location) -> pd.DataFrame:
    """The finished table of one model's output folder: the parts its manifest lists, one row per image."""
    if not exists(out, MANIFEST):
        raise FileNotFoundError(f"{out.display(MANIFEST)} not found: the bulk scoring run into {out.uri} has not "
                                "finished (re-run the same command to complete it)")
    manifest = json.loads(read_bytes(out, MANIFEST))
    names = [p["file"].removeprefix(f"{PARTS}/") for p in manifest["parts"]]
    return pa.concat_tables([read_part(out, n) for n in names]).to_pandas()
