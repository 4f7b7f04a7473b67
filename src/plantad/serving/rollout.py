"""One rollout controller per application decides which versions its replicas serve.

The controller alone reads the registry (every `serve.alias_poll_s`, and at once when a replica
passes on an MLflow webhook). It declares: the champion, the last-known-good version (a registry
alias it sets once every live replica serves a champion), the previous champion (kept loaded for
`serve.rollout.keep_previous_s` so a move back is served at once), an optional shadow and an
optional canary with its lines. Replicas ask it what to serve every `serve.rollout.follow_s`, report
what they actually serve, and send their traffic counts, from which the controller ends a canary
that rejects more than the champion (a one-sided two-proportion test) and writes the shadow's
comparison to the shadow version in the registry.

The controller is a plain object (tests drive it directly); in Serve it runs as a named Ray actor
that the replicas create on first use and that shares the fate of its creator: when it dies, the
next replica call creates a new one, which rebuilds the declared state from the registry (its
traffic counts start again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plantad.tracking.model_source import ModelRef, resolve_model
from plantad.tracking.registry import CANARY_TAG, ROLLED_BACK

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from plantad.config import ServeConfig

log = logging.getLogger(__name__)
LIVE_S = 10.0  # a replica that has not reported for this long no longer counts as live


@dataclass(frozen=True)
class Declared:
    """What every replica of the application should hold and serve now."""

    epoch: int = 0  # grows with each change, so replicas can tell a new declaration
    champion: str | None = None
    last_known_good: str | None = None
    previous: str | None = None  # the champion before the last move, kept loaded until previous_until
    previous_until: float = 0.0
    shadow: str | None = None
    canary: str | None = None
    canary_lines: tuple[str, ...] = ()
    canary_share: float = 0.0
    refs: dict[str, ModelRef] = field(default_factory=dict)  # version -> how to fetch it
    error: str | None = None  # the registry did not answer the last poll (the declaration stands)
    checked_at: float = 0.0

    def wanted(self, now: float) -> list[str]:
        """Versions a replica should hold, most needed first."""
        out = [self.champion, self.canary, self.shadow,
               self.previous if self.previous_until > now else None]
        return list(dict.fromkeys(v for v in out if v is not None))

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["refs"] = {v: r.describe() for v, r in self.refs.items()}
        return d


def sticky(line: str, share: float, salt: str) -> bool:
    """Whether `line` is among a `share` of all lines, always the same ones for one salt (a version)."""
    if share <= 0.0:
        return False
    digest = hashlib.sha256(f"{salt}:{line}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def canary_serves(declared: Declared, line: str) -> bool:
    return declared.canary is not None and (line in declared.canary_lines or
                                            sticky(line, declared.canary_share, f"canary-{declared.canary}"))


def shadow_scores(declared: Declared, line: str, share: float) -> bool:
    return declared.shadow is not None and sticky(line, share, f"shadow-{declared.shadow}")


def excess_test(x1: int, n1: int, x2: int, n2: int, margin: float) -> tuple[float, float]:
    """(z, one-sided p) that rate x1/n1 exceeds x2/n2 by more than `margin` (Wald, unpooled)."""
    p1, p2 = x1 / n1, x2 / n2
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    diff = p1 - p2 - margin
    if se == 0.0:  # both rates at 0 or 1: the observed gap is the answer
        return (math.inf, 0.0) if diff > 0 else (-math.inf, 1.0)
    z = diff / se
    return z, 0.5 * math.erfc(z / math.sqrt(2))


@dataclass
class RoleCounts:
    images: int = 0
    rejects: int = 0
    errors: int = 0

    def add(self, other: dict[str, int]) -> None:
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class ShadowLine:
    """Running sums for one line: agreement, reject rates, score correlation, latency."""

    images: int = 0
    agree: int = 0
    champion_rejects: int = 0
    shadow_rejects: int = 0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0
    champion_ms: float = 0.0
    shadow_ms: float = 0.0
    dropped: int = 0

    def add(self, other: dict[str, float]) -> None:
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)

    def table_row(self) -> dict[str, Any]:
        n = int(self.images)  # sums arrive as floats from the replicas
        if n == 0:
            return {"images": 0, "dropped": int(self.dropped)}
        vx, vy = self.sxx - self.sx ** 2 / n, self.syy - self.sy ** 2 / n
        corr = (self.sxy - self.sx * self.sy / n) / math.sqrt(vx * vy) if vx > 0 and vy > 0 else None
        return {"images": n, "dropped": int(self.dropped), "agreement": self.agree / n,
                "champion_reject_rate": self.champion_rejects / n, "shadow_reject_rate": self.shadow_rejects / n,
                "score_correlation": corr, "champion_ms_per_image": self.champion_ms / n,
                "shadow_ms_per_image": self.shadow_ms / n}


class RolloutController:
    """Declared state from the registry; replicas' reports; canary verdicts; shadow reports."""

    def __init__(self, cfg: ServeConfig, client: MlflowClient | None = None) -> None:
        from mlflow import MlflowClient

        self.cfg, self.rollout = cfg, cfg.rollout
        self.client = client or MlflowClient(cfg.tracking_uri, registry_uri=cfg.tracking_uri)
        self.name = cfg.model_name
        self._lock = threading.RLock()
        self.declared = Declared()
        self.replicas: dict[str, dict[str, Any]] = {}
        self.canary_counts: dict[str, RoleCounts] = {"champion": RoleCounts(), "canary": RoleCounts()}
        self.canary_ended: dict[str, dict[str, Any]] = {}  # version -> reason and figures
        self._ending: set[str] = set()
        self.shadow_lines: dict[str, ShadowLine] = {}
        self.shadow_pair: tuple[str | None, str | None] = (None, None)
        self.last_report: dict[str, Any] | None = None
        self._last_report_at = time.time()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.refresh()
        self._thread: threading.Thread | None = None

    # --- the registry ---------------------------------------------------------------------------
    def _resolve(self, alias: str | None) -> ModelRef | None:
        if not alias:
            return None
        from plantad.tracking.model_source import ModelSourceError

        try:
            return resolve_model(f"models:/{self.name}@{alias}", self.client)
        except ModelSourceError as exc:  # an alias nobody set is no error; a registry that fails is
            if any(code in str(exc) for code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")):
                return None
            raise

    def refresh(self) -> Declared:
        """Read the aliases now and declare what follows from them; an unreachable registry keeps
        the declaration and says so."""
        try:
            champion = self._resolve(self.cfg.model_alias)
            lkg = self._resolve(self.rollout.last_known_good_alias)
            shadow = self._resolve(self.rollout.shadow.alias) if self.rollout.shadow else None
            canary = self._resolve(self.rollout.canary.alias) if self.rollout.canary else None
        except Exception as exc:  # MLflow/HTTP errors: the registry is down; replicas keep what they serve
            with self._lock:
                self.declared = replace(self.declared, error=f"cannot read the registry: {exc}",
                                         checked_at=time.time())
            log.warning("rollout: cannot read the registry: %s", exc)
            return self.declared
        if canary is not None and (canary.version in self.canary_ended or canary.version in self._ending or canary.tags.get(CANARY_TAG) == ROLLED_BACK
                                   or (champion is not None and canary.version == champion.version)):
            canary = None
        if shadow is not None and champion is not None and shadow.version == champion.version:
            shadow = None
        with self._lock:
            old = self.declared
            now = time.time()
            previous, until = old.previous, old.previous_until
            new_champion = None if champion is None else champion.version
            if old.champion is not None and new_champion != old.champion:
                previous, until = old.champion, now + self.rollout.keep_previous_s
            # the champion's ref last, so a version that is also last-known-good is described as champion
            refs = {r.version: r for r in (canary, shadow, lkg, champion) if r is not None}
            if previous is not None and previous not in refs and previous in old.refs:
                refs[previous] = old.refs[previous]
            canary_cfg = self.rollout.canary
            new = Declared(
                epoch=old.epoch, champion=new_champion, last_known_good=None if lkg is None else lkg.version,
                previous=previous if until > now else None, previous_until=until if until > now else 0.0,
                shadow=None if shadow is None else shadow.version, canary=None if canary is None else canary.version,
                canary_lines=tuple(canary_cfg.lines) if canary_cfg and canary else (),
                canary_share=canary_cfg.share if canary_cfg and canary else 0.0,
                refs=refs, error=None, checked_at=now)
            if _changed(old, new):
                new = replace(new, epoch=old.epoch + 1)
                if new.canary != old.canary:
                    self.canary_counts = {"champion": RoleCounts(), "canary": RoleCounts()}
                log.info("rollout: champion %s, last-known-good %s, canary %s, shadow %s", new.champion,
                         new.last_known_good, new.canary, new.shadow)
            self.declared = new
            return new

    def state(self, fresh: bool = False) -> Declared:
        return self.refresh() if fresh else self.declared

    def check_now(self) -> None:
        """A webhook said an alias moved: read the registry at once."""
        self._wake.set()

    # --- replicas -------------------------------------------------------------------------------
    def report(self, replica: str, actual: dict[str, Any]) -> None:
        """A replica's actual state; once every live replica serves the champion, it becomes last-known-good."""
        with self._lock:
            self.replicas[replica] = {**actual, "reported_at": time.time()}
            live = self.live_replicas()
            champion = self.declared.champion
        if (champion is not None and champion != self.declared.last_known_good and live
                and all(r.get("serving") == champion for r in live.values())):
            try:
                self.client.set_registered_model_alias(self.name, self.rollout.last_known_good_alias, champion)
            except Exception as exc:  # the registry is down: set it at a later report
                log.warning("rollout: cannot set %s to v%s: %s", self.rollout.last_known_good_alias, champion, exc)
                return
            log.info("rollout: v%s is now %s (served by %d replica(s))", champion,
                     self.rollout.last_known_good_alias, len(live))
            self.refresh()

    def live_replicas(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        return {k: v for k, v in self.replicas.items() if now - v["reported_at"] < LIVE_S}

    def add_traffic(self, canary: dict[str, dict[str, int]], shadow: dict[str, dict[str, float]],
                    pair: tuple[str | None, str | None]) -> None:
        """Counts a replica gathered since its last call (canary by role; shadow by line, for `pair`:
        (shadow version, champion version))."""
        with self._lock:
            for role, counts in canary.items():
                self.canary_counts.setdefault(role, RoleCounts()).add(counts)
            if shadow:
                if tuple(pair) != self.shadow_pair:
                    self.shadow_lines, self.shadow_pair = {}, tuple(pair)
                for line, sums in shadow.items():
                    self.shadow_lines.setdefault(line, ShadowLine()).add(sums)
        self.evaluate_canary()

    # --- canary -----------------------------------------------------------------------------------
    def evaluate_canary(self) -> dict[str, Any] | None:
        """End the canary when its reject or error rate exceeds the champion's by more than the
        margin with one-sided p below alpha, both roles having `min_images`; returns the verdict."""
        cfg, version = self.rollout.canary, self.declared.canary
        if cfg is None or version is None:
            return None
        with self._lock:
            c, h = self.canary_counts["canary"], self.canary_counts["champion"]
        if c.images < cfg.min_images or h.images < cfg.min_images:
            return None
        for what, x1, x2 in (("reject rate", c.rejects, h.rejects), ("error rate", c.errors, h.errors)):
            z, p = excess_test(x1, c.images, x2, h.images, cfg.margin)
            if p < cfg.alpha:
                figures = {"what": what, "canary_images": c.images, "canary_rate": x1 / c.images,
                           "champion_images": h.images, "champion_rate": x2 / h.images,
                           "margin": cfg.margin, "z": z if math.isfinite(z) else None, "p_value": p, "alpha": cfg.alpha,
                           "champion": self.declared.champion}
                self.end_canary(version, f"canary {what} {x1 / c.images:.3f} exceeds the champion's "
                                         f"{x2 / h.images:.3f} by more than {cfg.margin} (one-sided p={p:.2g} "
                                         f"< {cfg.alpha}, {c.images} vs {h.images} images)", figures)
                return figures
        return None

    def end_canary(self, version: str, reason: str, figures: dict[str, Any]) -> None:
        """Stop serving the canary, say why on its version, and take its alias away."""
        with self._lock:
            if version in self.canary_ended or version in self._ending:
                return
            self._ending.add(version)
        log.warning("rollout: canary v%s rolled back: %s", version, reason)
        for key, value in ((CANARY_TAG, ROLLED_BACK), ("rollout.canary_reason", reason),
                           ("rollout.canary_figures", json.dumps(figures))):
            try:
                self.client.set_model_version_tag(self.name, version, key, value)
            except Exception as exc:  # keep going: the canary ends even if the registry is down
                log.warning("rollout: cannot tag v%s: %s", version, exc)
        alias = self.rollout.canary.alias if self.rollout.canary else None
        try:
            if alias and self.client.get_model_version_by_alias(self.name, alias).version == version:
                self.client.delete_registered_model_alias(self.name, alias)
        except Exception as exc:
            log.warning("rollout: cannot remove alias %s: %s", alias, exc)
        with self._lock:  # shown in /rollout once its tags are written
            self.canary_ended[version] = {"reason": reason, **figures, "at": time.time()}
        self.refresh()

    # --- shadow -----------------------------------------------------------------------------------
    def shadow_table(self) -> dict[str, Any]:
        with self._lock:
            lines = {k: ShadowLine(**asdict(v)) for k, v in self.shadow_lines.items()}
            shadow, champion = self.shadow_pair
        total = ShadowLine()
        for v in lines.values():
            total.add(asdict(v))
        return {"shadow": shadow, "champion": champion, "overall": total.table_row(),
                "lines": {k: v.table_row() for k, v in sorted(lines.items())}, "at": time.time()}

    def write_shadow_report(self) -> dict[str, Any]:
        """The comparison so far, as tags and an artifact (JSON and a Markdown table) of the shadow version."""
        table = self.shadow_table()
        version, overall = table["shadow"], table["overall"]
        if version is None or not overall.get("images"):
            raise ValueError("no shadow comparison yet: set serve.rollout.shadow and the "
                             f"'{self.rollout.shadow.alias if self.rollout.shadow else 'challenger'}' alias, "
                             "then send traffic")
        tags = {"shadow.vs_champion": str(table["champion"]), "shadow.images": str(overall["images"]),
                "shadow.agreement": f"{overall['agreement']:.4f}",
                "shadow.reject_rate": f"{overall['shadow_reject_rate']:.4f}",
                "shadow.champion_reject_rate": f"{overall['champion_reject_rate']:.4f}",
                "shadow.score_correlation": "" if overall["score_correlation"] is None
                else f"{overall['score_correlation']:.4f}"}
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)
        run_id = self.client.get_model_version(self.name, version).run_id
        with tempfile.TemporaryDirectory(prefix="plantad-shadow-") as tmp:
            folder = Path(tmp)
            (folder / "shadow.json").write_text(json.dumps(table, indent=2))
            (folder / "shadow.md").write_text(markdown_table(table))
            self.client.log_artifacts(run_id, str(folder), f"rollout/shadow-v{version}")
        with self._lock:
            self.last_report, self._last_report_at = table, time.time()
        return table

    # --- the loop and /rollout --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="plantad-rollout", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.cfg.alias_poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.refresh()
            shadow = self.rollout.shadow
            if shadow and time.time() - self._last_report_at >= shadow.report_every_s:
                try:
                    self.write_shadow_report()
                except ValueError:
                    self._last_report_at = time.time()
                except Exception as exc:  # the registry is down: try again at the next period
                    log.warning("rollout: shadow report not written: %s", exc)
                    self._last_report_at = time.time()

    def status(self) -> dict[str, Any]:
        with self._lock:
            counts = {k: asdict(v) for k, v in self.canary_counts.items()}
            return {"declared": self.declared.summary(), "replicas": self.live_replicas(),
                    "canary_counts": counts, "canary_ended": dict(self.canary_ended),
                    "shadow": self.shadow_table(), "last_shadow_report_at": self._last_report_at
                    if self.last_report else None}


class ControllerActor(RolloutController):
    """The controller as a Ray actor: built from the app's `serve` settings, polling at once."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from plantad.config import serve_config_from_dict

        super().__init__(serve_config_from_dict(settings, "the rollout controller's args"))
        self.start()


class ActorLink:
    """A replica's way to its application's controller: a named actor made by the first replica that
    asks (one per application and settings) and made again when it died."""

    def __init__(self, cfg: ServeConfig, timeout_s: float = 30.0) -> None:
        self.settings = json.loads(cfg.model_dump_json())
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:10]
        self.name = f"plantad-rollout-{cfg.app_name}-{digest}"
        self.timeout_s = timeout_s
        self._handle: Any = None

    def _actor(self) -> Any:
        import ray

        if self._handle is None:
            remote = ray.remote(num_cpus=0, max_concurrency=16)(ControllerActor)
            self._handle = remote.options(name=self.name, get_if_exists=True).remote(self.settings)
        return self._handle

    def _call(self, method: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import RayActorError

        for attempt in (1, 2):
            try:
                return ray.get(getattr(self._actor(), method).remote(*args), timeout=self.timeout_s)
            except RayActorError:  # its creator replica went away: the next call makes a new one
                self._handle = None
                if attempt == 2:
                    raise
            except ray.exceptions.GetTimeoutError as exc:
                raise TimeoutError(f"the rollout controller {self.name} did not answer {method} within "
                                   f"{self.timeout_s:.0f} s") from exc
        raise AssertionError("unreachable")

    def state(self, fresh: bool = False) -> Declared:
        return self._call("state", fresh)

    def report(self, replica: str, actual: dict[str, Any]) -> None:
        self._call("report", replica, actual)

    def add_traffic(self, canary: dict, shadow: dict, pair: tuple) -> None:
        self._call("add_traffic", canary, shadow, pair)

    def wake(self) -> None:
        self._call("check_now")

    def status(self) -> dict[str, Any]:
        return self._call("status")

    def write_shadow_report(self) -> dict[str, Any]:
        return self._call("write_shadow_report")


def markdown_table(table: dict[str, Any]) -> str:
    cols = ["images", "agreement", "champion_reject_rate", "shadow_reject_rate", "score_correlation",
            "champion_ms_per_image", "shadow_ms_per_image", "dropped"]

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [f"Shadow v{table['shadow']} against champion v{table['champion']}", "",
            "| line | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for line, row in [("(all)", table["overall"]), *table["lines"].items()]:
        rows.append(f"| {line} | " + " | ".join(cell(row.get(c)) for c in cols) + " |")
    return "\n".join(rows) + "\n"


def _changed(old: Declared, new: Declared) -> bool:
    keys = ("champion", "last_known_good", "previous", "shadow", "canary", "canary_lines", "canary_share")
    return any(getattr(old, k) != getattr(new, k) for k in keys)
