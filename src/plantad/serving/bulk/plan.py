"""The deterministic plan that makes bulk scoring resumable with exactly one row per image.

The driver lists the inputs (sorted) and cuts them into fixed parts; a part's file name holds its
index and a hash of its paths, so the same inputs always give the same names. A part is done iff
its file exists (written atomically), and a re-run scores only the parts whose file is missing.
Each model version writes under its own folder, `<output>/<model id>/`, so versions never mix.
`manifest.json`, written last, lists the parts that make up the table.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from plantad.models.checkpoint import MODEL_FILE
from plantad.storage import Location, exists, list_names, read_bytes, write_atomic
from plantad.tracking.model_source import ModelRef

PARTS = "parts"
MANIFEST = "manifest.json"
_PART_FILE = re.compile(r"^part-\d{5,}-[0-9a-f]{8}\.parquet$")

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

    @property
    def file(self) -> str:
        digest = hashlib.sha256("\n".join(self.relpaths).encode()).hexdigest()[:8]
        return f"part-{self.index:05d}-{digest}.parquet"


def plan_parts(relpaths: list[str], part_size: int) -> list[Part]:
    """Sorted inputs cut into parts of `part_size` (the last one shorter)."""
    ordered = sorted(relpaths)
    return [Part(i // part_size, tuple(ordered[i:i + part_size])) for i in range(0, len(ordered), part_size)]


def model_id(ref: ModelRef) -> str:
    """The output folder name of one model: `<name>-v<version>`, or `<folder>-<sha256[:12] of model.pt>`."""
    if ref.registered:
        return re.sub(r"[^A-Za-z0-9._-]", "_", f"{ref.name}-v{ref.version}")
    assert ref.local_dir is not None
    digest = hashlib.sha256()
    with open(Path(ref.local_dir) / MODEL_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{Path(ref.local_dir).name}-{digest.hexdigest()[:12]}")


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


def read_results(out: Location) -> pd.DataFrame:
    """The finished table of one model's output folder: the parts its manifest lists, one row per image."""
    if not exists(out, MANIFEST):
        raise FileNotFoundError(f"{out.display(MANIFEST)} not found: the bulk scoring run into {out.uri} has not "
                                "finished (re-run the same command to complete it)")
    manifest = json.loads(read_bytes(out, MANIFEST))
    names = [p["file"].removeprefix(f"{PARTS}/") for p in manifest["parts"]]
    return pa.concat_tables([read_part(out, n) for n in names]).to_pandas()
