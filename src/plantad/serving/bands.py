"""OK / REVIEW / NG bands per line, set live and audited.

A band is two probabilities: below `low` a part is OK, at or above `high` it is NG, between them
REVIEW. With no saved band a line uses the served version's calibrated threshold for both, which is
today's boolean decision. Every change is one immutable JSON object under `<store>/bands/` named by
its time, so replicas on any node (and two writing at once) never overwrite each other: the current
bands are the fold of the log in name order, and the log is the audit trail. Each replica re-reads
new objects every `serve.bands_poll_s`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from plantad.serving.inputs import LINE_NAME, ApiError
from plantad.storage import Location, list_names, read_bytes, write_atomic

log = logging.getLogger(__name__)
DEFAULT_LINE = "default"  # the band of every line that has none of its own
BANDS_DIR = "bands"
DECISIONS = ("OK", "REVIEW", "NG")


@dataclass(frozen=True)
class Band:
    low: float  # below: OK
    high: float  # at or above: NG; in between: REVIEW

    def decide(self, probability: float) -> str:
        if probability < self.low:
            return "OK"
        return "NG" if probability >= self.high else "REVIEW"


def _unit(doc: dict, name: str) -> float:
    v = doc[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ApiError(400, f"band {name} {v!r} is not a {'rate' if 'frr' in name else 'probability'} in [0, 1]")
    return float(v)


def parse_band(doc: Any) -> dict[str, float]:
    """A band as saved: probabilities {"low", "high"} (0 <= low <= high <= 1), or target false-reject
    rates on normal parts {"low_frr", "high_frr"} (high_frr <= low_frr), which carry across versions."""
    if isinstance(doc, dict) and set(doc) == {"low", "high"}:
        low, high = _unit(doc, "low"), _unit(doc, "high")
        if low > high:
            raise ApiError(400, f"band low {low} is above high {high}: below low is OK, at or above high NG")
        return {"low": low, "high": high}
    if isinstance(doc, dict) and set(doc) == {"low_frr", "high_frr"}:
        low, high = _unit(doc, "low_frr"), _unit(doc, "high_frr")
        if high > low:
            raise ApiError(400, f"band high_frr {high} is above low_frr {low}: the NG threshold rejects fewer "
                                "normal parts than the REVIEW one")
        return {"low_frr": low, "high_frr": high}
    raise ApiError(400, f"a band is {{\"low\": p, \"high\": p}} (probabilities) or {{\"low_frr\": r, "
                        f"\"high_frr\": r}} (false-reject rates on normal parts), got {doc!r}")


def threshold_for_rate(normal: np.ndarray, rate: float) -> float:
    """The lowest threshold that rejects at most `rate` of `normal` (probabilities of held-out normal
    images): a part is rejected at or above it, so the rejected share is <= rate, as close as n allows."""
    ordered = np.sort(np.asarray(normal))[::-1]  # highest first, in the dtype the probabilities were computed in
    k = int(math.floor(rate * len(ordered) + 1e-9))  # normal images we may reject
    if k >= len(ordered):
        return 0.0
    return float(min(1.0, np.nextafter(ordered[k], np.inf)))  # just above the (k+1)-th highest


def resolve(spec: dict[str, float], normal: np.ndarray | None) -> Band | None:
    """Probabilities of a saved band for the served version; None: rates without that version's quantiles."""
    if "low" in spec:
        return Band(spec["low"], spec["high"])
    if normal is None or len(normal) == 0:
        return None
    return Band(threshold_for_rate(normal, spec["low_frr"]), threshold_for_rate(normal, spec["high_frr"]))


def check_line(line: str, known: dict[str, str]) -> str:
    """A line name the bands accept: `default`, else a valid name, and one of `known` when that is set."""
    if line == DEFAULT_LINE:
        return line
    if not LINE_NAME.fullmatch(line):
        raise ApiError(400, f"line {line!r} is not a line name: 1 to 64 letters, digits, '_', '.', ':' or '-'")
    if known and line not in known:
        raise ApiError(404, f"unknown line {line!r}: serve.line_categories names {sorted(known)}")
    return line


def key_id(authorization: str | None, keys: frozenset[str]) -> str:
    """Who made a change, for the audit log: a hash prefix of the API key, never the key itself."""
    if not keys:
        return "open"  # no API keys configured: the deployment is open
    token = (authorization or "").partition(" ")[2].strip()
    return "key-" + hashlib.sha256(token.encode()).hexdigest()[:12]


def event_name(now: float) -> str:
    """Sortable and unique across replicas: nanoseconds, zero-padded, then a random suffix."""
    return f"{int(now * 1e9):020d}-{uuid.uuid4().hex[:12]}.json"


class BandBook:
    """The bands of every line as this replica last read them from the store, and the audit log."""

    def __init__(self, loc: Location | None, poll_s: float) -> None:
        self.loc, self.poll_s = loc, poll_s
        self.events: list[dict[str, Any]] = []
        self.bands: dict[str, dict[str, float]] = {}  # line -> saved spec (probabilities or rates)
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.last_error: str | None = None
        if loc is not None:
            self.refresh()  # a replica starts with the saved bands, or fails its start visibly
            threading.Thread(target=self._poll, name="plantad-bands", daemon=True).start()

    @property
    def version(self) -> str | None:
        """The newest change this replica applies (the records' band version)."""
        return self.events[-1]["id"] if self.events else None

    def refresh(self) -> None:
        assert self.loc is not None
        new = [n for n in list_names(self.loc, BANDS_DIR)
               if n.endswith(".json") and not n.startswith(".") and n not in self._seen]  # not a write in flight
        if not new:
            return
        docs = {n: dict(json.loads(read_bytes(self.loc, f"{BANDS_DIR}/{n}")), id=n.removesuffix(".json")) for n in new}
        with self._lock:  # the poll thread and a save may both have read a change: it is applied once
            fresh = [d for n, d in docs.items() if n not in self._seen]
            self._seen.update(docs)
            self.events = sorted(self.events + fresh, key=lambda e: e["id"])
            bands: dict[str, dict[str, float]] = {}
            for e in self.events:  # the fold: the last change of a line wins; new None resets it
                if e["new"] is None:
                    bands.pop(e["line"], None)
                else:
                    bands[e["line"]] = e["new"]
            self.bands = bands

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
                self.last_error = None
            except Exception as exc:  # a store blip: keep the bands read last, report it on /bands
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("reading band changes from %s failed: %s", self.loc and self.loc.uri, exc)

    def stop(self) -> None:
        self._stop.set()

    def spec(self, line: str | None) -> tuple[dict[str, float] | None, str]:
        bands = self.bands
        if line is not None and line in bands:
            return bands[line], "line"
        if DEFAULT_LINE in bands:
            return bands[DEFAULT_LINE], "default"
        return None, "calibrated"

    def band(self, line: str | None, calibrated: float, normal: np.ndarray | None = None) -> tuple[Band, str]:
        """(the band of `line` for the served version, where it comes from: 'line', 'default' or
        'calibrated'); rates are re-derived from `normal`, the version's held-out normal probabilities."""
        spec, source = self.spec(line)
        band = None if spec is None else resolve(spec, normal)
        if band is None:  # no band saved, or rates for a version without stored quantiles
            return Band(calibrated, calibrated), "calibrated"
        return band, source

    def save(self, line: str, band: dict[str, float] | None, who: str, model_version: str | None, calibrated: float,
             normal: np.ndarray | None = None) -> dict:
        """Append one change (None: back to the default) and apply it here at once; others within poll_s."""
        if self.loc is None:
            raise ApiError(409, "bands cannot be saved: serve.store is not set (a folder or s3:// prefix that "
                                "every replica reads)")
        self.refresh()
        old, source = self.band(line, calibrated, normal)
        old_spec = self.spec(line)[0] if source != "calibrated" else None
        now = time.time()
        new = None if band is None else resolve(band, normal)
        doc = {"at": now, "who": who, "line": line, "old": asdict(old), "old_source": source, "old_rates": None
               if old_spec is None or "low" in old_spec else old_spec, "new": band,
               "new_probabilities": None if new is None else asdict(new), "model_version": model_version}
        name = event_name(now)
        write_atomic(self.loc, f"{BANDS_DIR}/{name}", json.dumps(doc).encode())
        self.refresh()
        return {**doc, "id": name.removesuffix(".json")}

    def audit(self, line: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        events = [e for e in self.events if line is None or e["line"] == line]
        return list(reversed(events[-limit:]))
