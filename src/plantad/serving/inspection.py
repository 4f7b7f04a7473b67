"""The line's window in a replica: band decisions added to answers, per-part records, the recent
traffic ring, and the JSON of the bands, audit, review and traffic routes (app.py wires them)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict
from importlib import resources
from typing import Any

from ray.serve.metrics import Counter

from plantad.config import ConfigError, ServeConfig
from plantad.serving.bands import DECISIONS, DEFAULT_LINE, Band, BandBook, check_line, parse_band
from plantad.serving.inputs import LINE_NAME, ApiError, ImageInput
from plantad.serving.records import PartRecorder, Pending, image_path, pixel_sha256, read_records
from plantad.serving.review import parse_verdict, read_verdicts, review_queue, save_verdict
from plantad.serving.predictor import ImageScore, Predictor
from plantad.storage import Location, open_location, read_bytes
from plantad.tracking.registry import ALIAS_SET_AT

PART_ID_HEADER = "x-part-id"
TRAFFIC_WINDOW_S = 3600.0


def page_html(root: str) -> str:
    """The inspection page as one document (its CSS and JavaScript inlined: one request, so a replica
    with a short queue never answers the page without its script) with its base URL for any prefix."""
    page = resources.files("plantad.serving").joinpath("page")
    html = page.joinpath("index.html").read_text().replace("{{ROOT}}", root.rstrip("/") + "/")
    html = html.replace('<link rel="stylesheet" href="page/page.css">',
                        f"<style>\n{page.joinpath('page.css').read_text()}</style>")
    script = page.joinpath("page.js").read_text()
    return html.replace('<script src="page/page.js"></script>', f"<script>\n{script}</script>")


def normal_probabilities(predictor: Predictor):
    """The version's held-out normal probabilities (its quantiles for rate bands), None when it has none."""
    ref = predictor.drift_reference
    return None if ref is None else ref.probabilities


def part_ids(header: str | None, n: int) -> list[str | None]:
    """The client's part ids from `X-Part-Id`: one per image, comma-separated, in request order."""
    if header is None or not header.strip():
        return [None] * n
    ids = [p.strip() for p in header.split(",")]
    if len(ids) != n or not all(0 < len(p) <= 128 for p in ids):
        raise ApiError(400, f"X-Part-Id holds {len(ids)} ids for {n} images: give one per image, comma-separated "
                            "(1 to 128 characters each)")
    return ids


class Inspection:
    def __init__(self, cfg: ServeConfig) -> None:
        if cfg.records.enabled and cfg.store is None:
            raise ConfigError("serve.records.enabled needs serve.store: a folder or s3:// prefix for the records")
        self.cfg = cfg
        self.loc: Location | None = open_location(cfg.store, cfg.store_s3) if cfg.store else None
        self.bands = BandBook(self.loc, cfg.bands_poll_s)
        self.dropped = Counter("plantad_records_dropped", description="part records dropped because the "
                               "replica's buffer was full (the store is slow or down)")
        self.band_decisions = Counter("plantad_band_decisions", description="scored images by OK / REVIEW / NG "
                                      "band decision and line", tag_keys=("decision", "line"))
        self.recorder = (PartRecorder(self.loc, cfg.records, on_drop=lambda n: self.dropped.inc(n))
                         if cfg.records.enabled and self.loc is not None else None)
        self.traffic: deque[dict[str, Any]] | None = deque(maxlen=cfg.recent_traffic) if cfg.recent_traffic else None
        self._records: dict[str, list[dict]] = {}  # parts read (immutable)
        self._verdicts: dict[str, dict] = {}

    def stop(self) -> None:
        self.bands.stop()
        if self.recorder is not None:
            self.recorder.stop()

    def decide(self, items: list[ImageInput], answer: dict[str, Any], line: str | None, metrics_line: str,
               ids: list[str | None], predictor: Predictor, drift: list | None = None) -> None:
        """Add each scored entry's band decision to `answer`; record and remember the parts. `drift`:
        each scored (decoded) image's drift coordinates, in order, for the records."""
        band, block = self.band_block(line, predictor)
        runtime = predictor.info()["runtime"]
        pending: list[Pending] = []
        now = time.time()
        coords = iter(drift or [])
        for item, entry, part in zip(items, answer["results"], ids):
            if item.decoded is None:
                continue
            vector = next(coords, None)
            decision = band.decide(entry["probability"])
            entry["decision"], entry["band"] = decision, block
            self.band_decisions.inc(tags={"decision": decision, "line": metrics_line})
            if part is not None:
                entry["part_id"] = part
            row = {"time": now, "line": line, "part_id": part, "model_version": entry["model_version"],
                   "decision": decision, "probability": entry["probability"]}
            if self.recorder is not None:
                sha = entry["sha256"] = pixel_sha256(item.decoded.image)
                keep = self.recorder.wants_image(decision)
                pending.append(Pending({**row, "sha256": sha, "runtime": runtime, "band_version": self.bands.version,
                                        "band_low": band.low, "band_high": band.high, "image_stored": keep,
                                        "replica": self.recorder.replica,
                                        "drift": None if vector is None else vector.tolist(),
                                        **{k: entry[k] for k in ("p_local", "p_semantic", "local_score",
                                                                 "semantic_score")}},
                                       item.decoded.image if keep else None))
            if self.traffic is not None:
                self.traffic.appendleft(row)
        if self.recorder is not None and pending:
            self.recorder.add(pending)

    def band_block(self, line: str | None, predictor: Predictor) -> tuple[Band, dict[str, Any]]:
        """The band `line` decides with and how answers show it: low, high, source, version (, rates)."""
        band, source = self.bands.band(line, predictor.threshold, normal_probabilities(predictor))
        spec = self.bands.spec(line)[0] if source != "calibrated" else None
        return band, {**asdict(band), "source": source, "version": self.bands.version,
                      **({"rates": spec} if spec is not None and "low_frr" in spec else {})}

    def decide_v2(self, items: list[ImageInput], scores: list[ImageScore], line: str | None, metrics_line: str,
                  ids: list[str | None], predictor: Predictor,
                  drift: list | None = None) -> tuple[list[str], dict[str, Any]]:
        """The band decisions of an Open Inference request (recorded like /score's) and its band block."""
        entries = [{"probability": s.probability, "model_version": predictor.ref.version, "p_local": s.p_local,
                    "p_semantic": s.p_semantic, "local_score": s.local_score, "semantic_score": s.semantic_score}
                   for s in scores]
        self.decide(items, {"results": entries}, line, metrics_line, ids, predictor, drift)
        return [e["decision"] for e in entries], entries[0]["band"] if entries else self.band_block(line, predictor)[1]

    # --- routes (each returns (status, body) for ScoringServer._answer) ---

    def bands_status(self, predictor: Predictor) -> tuple[int, Any]:
        """Saved specs and, for the served version, the probabilities each line decides with."""
        normal = normal_probabilities(predictor)
        lines = {k: {"saved": v, **asdict(self.bands.band(k, predictor.threshold, normal)[0])}
                 for k, v in self.bands.bands.items()}
        return 200, {"lines": lines, "calibrated": predictor.threshold, "model_version": predictor.ref.version,
                     "default": asdict(self.bands.band(None, predictor.threshold, normal)[0]),
                     "version": self.bands.version, "reference_normal_images": 0 if normal is None else len(normal),
                     "store": None if self.loc is None else self.loc.uri, "known_lines": self.cfg.line_categories,
                     "last_error": self.bands.last_error, "poll_s": self.cfg.bands_poll_s}

    def save_band(self, line: str, doc: dict[str, Any], who: str, predictor: Predictor) -> tuple[int, Any]:
        check_line(line, self.cfg.line_categories)
        band = None if doc == {"reset": True} else parse_band(doc)
        if band is not None and "low_frr" in band and normal_probabilities(predictor) is None:
            raise ApiError(409, f"version {predictor.ref.version} stores no held-out normal probabilities: give the "
                                "band as probabilities {low, high}")
        return 200, self.bands.save(line, band, who, predictor.ref.version, predictor.threshold,
                                    normal_probabilities(predictor))

    def audit(self, line: str | None, limit: int) -> tuple[int, Any]:
        self.bands.refresh() if self.loc is not None else None
        return 200, {"changes": self.bands.audit(line, limit)}

    def _store(self) -> Location:
        if self.loc is None or self.recorder is None:
            raise ApiError(409, "the review queue is off: set serve.store and serve.records.enabled: true")
        return self.loc

    def queue(self, line: str | None, limit: int) -> tuple[int, Any]:
        loc = self._store()
        self.recorder.flush() if self.recorder is not None else None  # this replica's own rows, now
        items = review_queue(read_records(loc, self._records), read_verdicts(loc, self._verdicts), line, limit)
        return 200, {"items": [{k: v for k, v in r.items() if k != "drift"} for r in items]}  # coordinates: reports

    def image(self, sha: str) -> bytes:
        loc = self._store()
        if len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha):
            raise ApiError(400, f"{sha!r} is not a sha256 (64 lowercase hex digits)")
        try:
            return read_bytes(loc, image_path(sha))
        except FileNotFoundError:
            raise ApiError(404, f"no stored image {sha}") from None

    def review(self, doc: Any, who: str) -> tuple[int, Any]:
        loc = self._store()
        sha, verdict, defect = parse_verdict(doc)
        return 200, save_verdict(loc, sha, verdict, defect, who)

    def reviews(self, limit: int) -> tuple[int, Any]:
        return 200, {"reviews": list(reversed(read_verdicts(self._store(), self._verdicts)[-limit:]))}

    def info(self, keys_on: bool, predictor: Predictor) -> tuple[int, Any]:
        """What the page needs, and the state of the writes to the store (errors, drops)."""
        cfg, rec, ref = self.cfg, self.recorder, predictor.ref
        return 200, {"promoted_at": promoted_at(ref.tags, ref.alias), "promoted_alias": ref.alias,
                     "records": rec is not None, "store": None if self.loc is None else self.loc.uri,
                     "recent_traffic": cfg.recent_traffic, "lines": sorted(cfg.line_categories),
                     "mlflow_ui_url": cfg.mlflow_ui_url, "keys": keys_on, "bands_error": self.bands.last_error,
                     "records_error": None if rec is None else rec.last_error,
                     "records_written": 0 if rec is None else rec.written_rows,
                     "records_dropped": 0 if rec is None else rec.dropped}

    def recent(self, line: str | None, decision: str | None, limit: int) -> tuple[int, Any]:
        if self.traffic is None:
            return 200, {"enabled": False, "items": [], "rates": {}}
        if decision is not None and decision not in DECISIONS:
            raise ApiError(400, f"decision {decision!r} is not one of {list(DECISIONS)}")
        rows = list(self.traffic)
        hour = [r for r in rows if r["time"] >= time.time() - TRAFFIC_WINDOW_S and (line is None or r["line"] == line)]
        rates = {d: sum(r["decision"] == d for r in hour) / len(hour) for d in DECISIONS} if hour else {}
        items = [r for r in rows
                 if (line is None or r["line"] == line) and (decision is None or r["decision"] == decision)]
        return 200, {"enabled": True, "items": items[:limit], "rates": rates, "last_hour": len(hour)}


def promoted_at(tags: dict[str, str], alias: str | None) -> float | None:
    """When plantad pointed `alias` at this version (its `alias_set_at.<alias>` tag, written by
    `plantad promote`, the register gate and set_alias); None for a folder or an alias moved elsewhere."""
    stamp = tags.get(f"{ALIAS_SET_AT}{alias}") if alias else None
    try:
        return float(stamp) if stamp else None
    except ValueError:
        return None  # a tag someone edited by hand: shown as unknown, not a failed page


def query_line(value: str | None) -> str | None:
    if value in (None, ""):
        return None
    if value != DEFAULT_LINE and not LINE_NAME.fullmatch(value):
        raise ApiError(400, f"line {value!r} is not a line name")
    return value


def query_limit(value: str | None, default: int = 100) -> int:
    if value in (None, ""):
        return default
    if not value.isdigit() or not 1 <= int(value) <= 10000:
        raise ApiError(400, f"limit {value!r} is not a number from 1 to 10000")
    return int(value)
