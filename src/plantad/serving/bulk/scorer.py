"""The two Ray Data steps of bulk scoring: reading image bytes (tasks) and scoring them (an actor
pool whose actors each hold one `Predictor` of exactly the version the driver resolved).

Decoding goes through `decode_untrusted` under the configured byte and pixel limits (the byte limit
is checked first on the listing's size, so an oversized file is never read); an image that cannot be
read or decoded, whatever the decoder raises, becomes a row with `error` set and no score, never a
failed job. A transient read error is retried first, so it does not become a permanent error row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa

from plantad.config import BulkConfig
from plantad.data.images import DecodedImage, ImageDecodeError, decode_untrusted
from plantad.serving.bulk.plan import SCHEMA
from plantad.storage import Location, read_bytes, write_atomic
from plantad.tracking.model_source import ModelRef

log = logging.getLogger(__name__)
SCORE_FIELDS = ["probability", "is_anomalous", "p_local", "p_semantic", "local_score", "semantic_score", "threshold"]


PERMANENT_READ_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
READ_ATTEMPTS = 4  # of a local read failing with another OSError (EIO, ESTALE on NFS ...); waits 0.2, 0.4, 0.8 s


def read_image(src: Location, key: str, size: int, max_bytes: int) -> tuple[bytes, str | None]:
    """(bytes, None), or (b"", why) for a file over `max_bytes` by the listing's size (not opened),
    gone, unreadable, or failing all READ_ATTEMPTS. A storage fault that outlasts read_bytes' S3
    retries raises StorageError: the task fails rather than committing a false error row."""
    if size > max_bytes:
        return b"", f"cannot decode image {src.display(key)}: {size} bytes is over the limit of {max_bytes} bytes"
    for attempt in range(READ_ATTEMPTS):
        try:
            data = read_bytes(src, key, limit=max_bytes)
        except PERMANENT_READ_ERRORS as exc:
            return b"", f"cannot read {src.display(key)}: {exc}"
        except OSError as exc:
            if attempt == READ_ATTEMPTS - 1:
                return b"", f"cannot read {src.display(key)} after {READ_ATTEMPTS} attempts: {exc}"
            log.warning("read %s failed (%s), retrying", src.display(key), exc)
            time.sleep(0.2 * 2**attempt)
            continue
        if len(data) > max_bytes:  # it grew after the listing
            return b"", f"cannot decode image {src.display(key)}: over the limit of {max_bytes} bytes"
        return data, None
    raise AssertionError("unreachable")


def read_batch(batch: pd.DataFrame, src: Location, max_bytes: int) -> pd.DataFrame:
    """Ray Data map: listed entries -> their bytes (empty, with `read_error` set, when refused,
    oversized, unreadable or gone)."""
    data, errors = [], []
    for key, size, refused in zip(batch["key"], batch["size"], batch["refused"]):
        # a missing value arrives as None or NaN (pandas' string columns): only a str is a refusal
        got, error = (b"", refused) if isinstance(refused, str) else read_image(src, key, int(size), max_bytes)
        data.append(got)
        errors.append(error)
    return batch.assign(data=data, read_error=errors)


def heatmap_rel(relpath: str) -> str:
    """Where an image's heatmap goes under `<maps>/<model id>/`: its relative path + `.heatmap.png`."""
    return f"{relpath}.heatmap.png"


class BulkScorer:
    """Callable class for `map_batches`: loads the pinned version once, scores batches of bytes."""

    def __init__(self, ref: ModelRef, model_id: str, tracking_uri: str | None, bulk: BulkConfig, src: Location,
                 maps: Location | None) -> None:
        import torch

        from plantad.serving.predictor import Predictor

        torch.set_num_threads(max(1, round(bulk.cpus_per_actor)))
        self.predictor = Predictor.from_ref(ref, tracking_uri, device=bulk.device, runtime=bulk.runtime)
        self.bulk, self.src, self.model_id = bulk, src, model_id
        self.maps = None if maps is None else maps.child(model_id)
        info = self.predictor.info()
        self.identity = {
            "model_id": model_id, "model_name": ref.name, "model_version": ref.version, "model_alias": ref.alias,
            "model_uri": ref.version_uri, "teacher": json.dumps(info["teacher"], sort_keys=True),
        }
        log.info("bulk scorer holds %s on %s (%s)", ref.describe(), info["device"], info["runtime"])

    def _decode(self, key: str, data: bytes, read_error: str | None) -> DecodedImage | str:
        if isinstance(read_error, str):  # None or NaN when the read went well
            return read_error
        source = self.src.display(key)
        try:
            return decode_untrusted(data, source, self.bulk.max_image_bytes, self.bulk.max_image_pixels)
        except ImageDecodeError as exc:
            return str(exc)
        except Exception as exc:  # a decoder bug on one file (Pillow plugins raise what they like): that file's row
            return f"cannot decode image {source}: {type(exc).__name__}: {exc}"

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        rows = []
        decoded: list[tuple[dict, DecodedImage]] = []
        for rel, key, data, read_error in zip(batch["relpath"], batch["key"], batch["data"], batch["read_error"]):
            row = {"path": self.src.display(key), "relpath": rel, "sha256": hashlib.sha256(data).hexdigest(),
                   "error": None, "map_path": None, **self.identity}
            result = self._decode(key, data, read_error)
            if isinstance(result, str):
                row["error"] = result
            else:
                row.update(width=result.width, height=result.height)
                decoded.append((row, result))
            rows.append(row)
        with_maps = self.maps is not None
        scores = self.predictor.score([d.image for _, d in decoded], with_maps=with_maps) if decoded else []
        for (row, image), score in zip(decoded, scores):
            row.update({k: getattr(score, k) for k in SCORE_FIELDS})
            if with_maps and score.anomaly_map is not None:
                row["map_path"] = self._write_map(row["relpath"], image, score.anomaly_map)
        frame = pd.DataFrame(rows).reindex(columns=SCHEMA.names)  # absent columns (all errors) become null
        frame["scored_at"] = datetime.now(timezone.utc)
        table = pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False)  # fixed types for every batch
        return table.append_column("part", pa.array(batch["part"].to_numpy(), pa.int64()))

    def _write_map(self, rel: str, image: DecodedImage, amap) -> str:
        from plantad.serving.render import heatmap_overlay_png

        assert self.maps is not None
        target = heatmap_rel(rel)
        write_atomic(self.maps, target, heatmap_overlay_png(image.image, amap, self.predictor.lambda_local))
        return self.maps.display(target)

