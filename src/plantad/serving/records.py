"""A record per scored part, appended by each replica to Parquet parts under `<store>/records/`.

Scoring never waits on the store: rows go into a bounded buffer and a background thread writes
them every `serve.records.flush_s` as one new part named by the replica and the time (so replicas
never write the same object, and a part is whole or absent). A full buffer drops rows and counts
them (`plantad_records_dropped`). The images of REVIEW and NG parts (and a sampled share of OK
ones) go to `<store>/images/<sha256>.png`, content-addressed, under a size cap.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from plantad.config import RecordsConfig
from plantad.storage import Location, exists, list_names, read_bytes, write_atomic

log = logging.getLogger(__name__)
RECORDS_DIR = "records"
IMAGES_DIR = "images"
MAX_PENDING_IMAGES = 256  # decoded images a replica holds for the next flush; beyond: the row without its image
SCHEMA = pa.schema([
    ("time", pa.float64()), ("line", pa.string()), ("part_id", pa.string()), ("sha256", pa.string()),
    ("model_version", pa.string()), ("runtime", pa.string()), ("band_version", pa.string()),
    ("band_low", pa.float64()), ("band_high", pa.float64()), ("probability", pa.float64()),
    ("p_local", pa.float64()), ("p_semantic", pa.float64()), ("local_score", pa.float64()),
    ("semantic_score", pa.float64()), ("decision", pa.string()), ("image_stored", pa.bool_()),
    ("replica", pa.string()),
    # the image's drift coordinates: its teacher embedding projected by the version's drift reference,
    # as the line's window holds them (serving/drift.py); null without a reference or with drift off
    ("drift", pa.list_(pa.float32())),
])


def pixel_sha256(image: Image.Image) -> str:
    """The part image's identity: its size and RGB pixels, so a lossless re-encoding is the same image."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()


def image_path(sha: str) -> str:
    return f"{IMAGES_DIR}/{sha}.png"


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue()


@dataclass
class Pending:
    row: dict[str, Any]
    image: Image.Image | None  # to store with the row, when its decision asks for it


class PartRecorder:
    """One replica's writer of records and stored images; `add` never blocks."""

    def __init__(self, loc: Location, cfg: RecordsConfig, on_drop: Any = None) -> None:
        self.loc, self.cfg, self.on_drop = loc, cfg, on_drop
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # unique per replica
        self.buffer: deque[Pending] = deque()
        self.dropped = 0
        self.pending_images = 0
        self.written_rows = 0
        self.image_bytes = 0  # written by this replica (the cap's count)
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plantad-records", daemon=True)
        self._thread.start()

    def wants_image(self, decision: str) -> bool:
        if not self.cfg.images or self.image_bytes >= self.cfg.images_max_bytes:
            return False
        return decision != "OK" or random.random() < self.cfg.ok_image_share

    def add(self, rows: list[Pending]) -> int:
        """Queue rows; those beyond `buffer_rows` are dropped and counted. Returns how many were dropped."""
        with self._lock:
            room = self.cfg.buffer_rows - len(self.buffer)
            kept, dropped = rows[:max(room, 0)], rows[max(room, 0):]
            for p in kept:  # bounded memory: a slow store must not pile up decoded images
                if p.image is not None:
                    if self.pending_images >= MAX_PENDING_IMAGES:
                        p.image, p.row["image_stored"] = None, False
                    else:
                        self.pending_images += 1
            self.buffer.extend(kept)
            self.dropped += len(dropped)
        if dropped and self.on_drop is not None:
            self.on_drop(len(dropped))
        if len(self.buffer) >= self.cfg.part_rows:
            self._wake.set()
        return len(dropped)

    def _take(self) -> list[Pending]:
        with self._lock:
            n = min(len(self.buffer), self.cfg.part_rows)
            batch = [self.buffer.popleft() for _ in range(n)]
            self.pending_images -= sum(p.image is not None for p in batch)  # taken: written, or lost with the part
            return batch

    def flush(self) -> int:
        """Write what is pending now (several parts if needed); returns the rows written."""
        total = 0
        while batch := self._take():
            for p in batch:
                if p.image is not None:
                    p.row["image_stored"] = self._store_image(p.row["sha256"], p.image)
            rows = [p.row for p in batch]
            table = pa.Table.from_pylist(rows, schema=SCHEMA)
            out = io.BytesIO()
            pq.write_table(table, out)
            now = time.time()
            day = time.strftime("%Y-%m-%d", time.gmtime(now))
            write_atomic(self.loc, f"{RECORDS_DIR}/{day}/{int(now * 1e9):020d}-{self.replica}.parquet",
                         out.getvalue())
            total += len(rows)
        self.written_rows += total
        return total

    def _store_image(self, sha: str, image: Image.Image) -> bool:
        rel = image_path(sha)
        if exists(self.loc, rel):
            return True
        if self.image_bytes >= self.cfg.images_max_bytes:
            return False
        data = png_bytes(image)
        write_atomic(self.loc, rel, data)
        self.image_bytes += len(data)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.cfg.flush_s)
            self._wake.clear()
            self._flush_logged()
        self._flush_logged()  # rows added while the last flush ran: a graceful stop leaves none behind

    def _flush_logged(self) -> None:
        try:
            self.flush()
            self.last_error = None
        except Exception as exc:  # the store is down: the rows stay lost for this part, scoring goes on
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("writing records to %s failed: %s", self.loc.uri, exc)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write what is pending and end the writer thread (waits up to `timeout_s` for the store)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)


def read_records(loc: Location, cache: dict[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """Every record in the store, oldest first; parts are immutable, so `cache` keeps those read."""
    cache = {} if cache is None else cache
    rows: list[dict[str, Any]] = []
    for day in _days(loc):
        for name in list_names(loc, f"{RECORDS_DIR}/{day}"):
            rel = f"{RECORDS_DIR}/{day}/{name}"
            if not name.endswith(".parquet") or name.startswith("."):
                continue
            if rel not in cache:
                cache[rel] = _part_rows(pq.read_table(io.BytesIO(read_bytes(loc, rel))))
            rows.extend(cache[rel])
    return sorted(rows, key=lambda r: r["time"])


def _part_rows(table: pa.Table) -> list[dict[str, Any]]:
    """A part's rows with every SCHEMA column: columns a part written by an older plantad lacks are None."""
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    rows = table.to_pylist()
    for row in rows:
        row.update(dict.fromkeys(missing))
    return rows


def _days(loc: Location) -> list[str]:
    import pyarrow.fs as pafs

    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path(RECORDS_DIR), allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
