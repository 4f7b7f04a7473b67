"""The versions a replica holds, and how it follows its application's rollout controller.

A daemon thread asks the controller (serving/rollout.py) every `serve.rollout.follow_s` what to
serve and loads what it lacks beside the serving version: fetch, warm up, then the self-test against
the outputs recorded with that version (serving/golden.py). Right before a new champion is swapped
in, the controller reads the registry again, so a move back during a slow load wins. The swap is one
reference: a batch reads it once, so requests in flight finish on the version they started with.

A version that fails its self-test or cannot be built is refused until the alias leaves it; one that
could not be fetched or ran out of memory is tried again with a backoff. A replica that starts while
the champion cannot be served starts on the last-known-good version and says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from plantad.config import ServeConfig
from plantad.models.checkpoint import ModelLoadError
from plantad.serving.forward import ForwardThread
from plantad.serving.golden import SelfTestError, golden_images, self_test
from plantad.serving.memory import (check_swap_fits, measure_growth, predictor_footprint, resident_bytes,
                                    swap_room)
from plantad.serving.predictor import Predictor
from plantad.serving.rollout import Declared, RolloutController
from plantad.tracking.golden import load_golden
from plantad.tracking.model_source import ModelFetchError, ModelRef, cache_entry, prune_cache

__all__ = ["ModelHolder", "SelfTestError"]
log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_RETRY_S = 300.0  # longest wait between two tries of a version that could not be fetched or fit


@dataclass(frozen=True)
class SwapError:
    version: str | None
    error: str
    at: float
    retry_at: float | None = None  # set when the failure may pass (store down, out of memory)
    failures: int = 1


class Link(Protocol):
    """How a holder reaches its controller: in-process (tests, a fixed folder) or a Ray actor."""

    def state(self, fresh: bool = False) -> Declared: ...
    def report(self, replica: str, actual: dict[str, Any]) -> None: ...
    def add_traffic(self, canary: dict, shadow: dict, pair: tuple) -> None: ...
    def wake(self) -> None: ...
    def status(self) -> dict[str, Any]: ...


class LocalLink:
    """A controller in this process."""

    def __init__(self, controller: RolloutController) -> None:
        self.controller = controller

    def state(self, fresh: bool = False) -> Declared:
        return self.controller.state(fresh)

    def report(self, replica: str, actual: dict[str, Any]) -> None:
        self.controller.report(replica, actual)

    def add_traffic(self, canary: dict, shadow: dict, pair: tuple) -> None:
        self.controller.add_traffic(canary, shadow, pair)

    def wake(self) -> None:
        self.controller.check_now()

    def status(self) -> dict[str, Any]:
        return self.controller.status()


class FixedLink:
    """A model folder: one version, nothing to follow."""

    def __init__(self, ref: ModelRef) -> None:
        self.declared = Declared(epoch=1, champion="folder", refs={"folder": ref}, checked_at=time.time())
        self.replicas: dict[str, dict[str, Any]] = {}

    def state(self, fresh: bool = False) -> Declared:
        return self.declared

    def report(self, replica: str, actual: dict[str, Any]) -> None:
        self.replicas[replica] = actual

    def add_traffic(self, canary: dict, shadow: dict, pair: tuple) -> None:
        pass

    def wake(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"declared": self.declared.summary(), "replicas": self.replicas}


def node_cache_dir(cfg: ServeConfig) -> Path:
    """The node's model cache, shared by every replica on it."""
    import tempfile

    return Path(cfg.model_cache_dir) if cfg.model_cache_dir else Path(tempfile.gettempdir()) / "plantad-models"


def drop_cached(cache_dir: Path, ref: ModelRef) -> None:
    from filelock import FileLock

    entry = cache_entry(cache_dir, ref)
    with FileLock(str(entry) + ".lock"):
        shutil.rmtree(entry, ignore_errors=True)
    log.warning("the cached copy of %s in %s was damaged: fetching it again", ref.describe(), entry)


def _transient(exc: BaseException) -> bool:
    """Failures worth trying again: the store did not deliver, or memory ran out while loading."""
    return isinstance(exc, (ModelFetchError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _warm_and_test(predictor: Predictor, images: list, expected: dict[str, Any] | None, atol: float) -> str:
    """Warm a loaded version up, then self-test it: both where its forwards will run."""
    predictor.warm_up()
    return self_test(predictor, images, expected, atol)


def _key(version: str | None) -> str:
    return "folder" if version is None else str(version)


class ModelHolder:
    """The serving Predictor plus a canary, a shadow and the previous champion, as declared."""

    def __init__(self, cfg: ServeConfig, link: Link, replica: str, cache_dir: Path | None = None,
                 on_poll: Callable[[], None] | None = None, reserved_bytes: int | None = None,
                 forward: ForwardThread | None = None) -> None:
        """`on_poll` runs after each poll (the replica hands its traffic counts to the controller);
        `reserved_bytes`: the memory Ray reserved for the replica, which a version loaded beside
        those held must fit in (None: not checked); `forward`: the replica's forward thread, where a
        loaded version warms up and takes its self-test (None: the loading thread)."""
        self.forward = forward
        self.reserved_bytes = reserved_bytes
        self.footprints: dict[str, int] = {}  # version -> measured bytes of its load and warm-up
        self.cfg, self.link, self.replica, self.on_poll = cfg, link, replica, on_poll
        self.cache_dir = cache_dir or node_cache_dir(cfg)
        self.poll_s = cfg.rollout.follow_s
        self.extra_golden = [cfg.golden_image] if cfg.golden_image else []
        self._client = self._mlflow_client()
        self.run_metrics: dict[str, dict[str, float | None]] = {}
        self.checked: dict[str, str] = {}  # version -> what its self-test checked
        self.loaded: dict[str, Predictor] = {}
        self.refused: dict[str, SwapError] = {}  # not tried again while the alias stays on it
        self.waiting: dict[str, SwapError] = {}  # tried again at retry_at
        self.swaps = 0
        self.last_check = time.time()
        self.behind_since: float | None = None
        self.declared = link.state(fresh=True)
        self.current: Predictor = self._start(self.declared)
        self.canary: Predictor | None = None
        self.shadow: Predictor | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_forever, name="plantad-follower", daemon=True)
        self._thread.start()

    def _mlflow_client(self) -> Any:
        if self.cfg.model_dir is not None:
            return None
        from mlflow import MlflowClient

        return MlflowClient(self.cfg.tracking_uri, registry_uri=self.cfg.tracking_uri)

    # --- loading ----------------------------------------------------------------------------------
    def _load(self, ref: ModelRef) -> Predictor:
        started = time.perf_counter()
        metrics = self._run_metrics(ref)  # before the download: a registry that fails here fails cheaply
        golden = load_golden(self._client, ref) if ref.registered else None
        try:
            predictor = Predictor.from_ref(ref, self.cfg.tracking_uri, self.cfg.device, self.cache_dir,
                                           runtime=self.cfg.runtime)
        except ModelLoadError:
            if not ref.registered:
                raise
            drop_cached(self.cache_dir, ref)  # a damaged copy in the node's cache: fetched again, once
            predictor = Predictor.from_ref(ref, self.cfg.tracking_uri, self.cfg.device, self.cache_dir,
                                           runtime=self.cfg.runtime)
        if ref.registered:
            prune_cache(cache_entry(self.cache_dir, ref).parent, self.cfg.model_cache_keep)
        images, expected = golden if golden else (golden_images(self.extra_golden), None)
        checked = self._on_forward(_warm_and_test, predictor, images, expected, self.cfg.rollout.golden_atol)
        self.run_metrics[_key(ref.version)] = metrics
        self.checked[_key(ref.version)] = checked
        log.info("loaded %s in %.1f s (%s)", ref.describe(), time.perf_counter() - started, checked)
        return predictor

    def _on_forward(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args) if self.forward is None else self.forward.run(fn, *args)

    def _run_metrics(self, ref: ModelRef) -> dict[str, float | None]:
        """The evaluation metrics of the run that produced the version (for /model)."""
        import math

        if self._client is None or not ref.run_id:
            return {}
        try:
            metrics = self._client.get_run(ref.run_id).data.metrics
        except Exception as exc:  # MLflow and HTTP errors: the tracking server did not answer
            raise ModelFetchError(f"cannot read run {ref.run_id} of {ref.describe()} from {self.cfg.tracking_uri}: "
                                  f"{exc}") from exc
        return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}

    def _try(self, version: str, ref: ModelRef) -> Predictor | None:
        """Load `version` or record why not (refused for good, or waiting for a retry)."""
        try:
            if self.loaded and self.reserved_bytes is not None:  # a new version beside those held
                check_swap_fits(resident_bytes(), max(self.footprints.values(), default=0), self.reserved_bytes)
            predictor, grown = measure_growth(lambda: self._load(ref))
            self.footprints[version] = predictor_footprint(predictor.model, grown)
        except Exception as exc:  # any failure leaves the serving version alone
            now = time.time()
            if _transient(exc):
                before = self.waiting.get(version)
                failures = before.failures + 1 if before else 1
                retry_at = now + min(self.poll_s * 4 * 2 ** failures, MAX_RETRY_S)
                self.waiting[version] = SwapError(version, f"{ref.describe()} not served yet: {exc}", now,
                                                  retry_at, failures)
                log.warning("%s; trying again in %.0f s", self.waiting[version].error, retry_at - now)
            else:
                self.refused[version] = SwapError(version, f"{ref.describe()} not served: {type(exc).__name__}: "
                                                           f"{exc}", now)
                log.error("%s", self.refused[version].error)
            return None
        self.waiting.pop(version, None)
        self.loaded[version] = predictor
        return predictor

    def _start(self, d: Declared) -> Predictor:
        """The first version: the champion, else the last-known-good; neither fails the replica start."""
        for version in dict.fromkeys(v for v in (d.champion, d.last_known_good) if v is not None):
            predictor = self._try(version, d.refs[version])
            if predictor is not None:
                if version != d.champion:
                    log.warning("starting on last-known-good v%s: the champion v%s cannot be served", version,
                                d.champion)
                return predictor
        errors = "; ".join(e.error for e in (*self.refused.values(), *self.waiting.values()))
        raise RuntimeError(f"no version of {self.cfg.model_uri} can be served "
                           f"(champion {d.champion}, last-known-good {d.last_known_good}): {errors or d.error}")

    # --- following --------------------------------------------------------------------------------
    def check_now(self) -> None:
        """A webhook said an alias moved: the controller reads the registry, this replica follows."""
        self.link.wake()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.poll_once()
                if self.on_poll is not None:
                    self.on_poll()
            except Exception:  # the controller is restarting: the next poll asks again
                log.exception("following the rollout controller failed")

    def poll_once(self) -> None:
        """Load what is declared and missing, swap in the champion once it passed, drop what is not wanted."""
        d = self.link.state()
        self.last_check = now = time.time()
        wanted = d.wanted(now)
        for version in list(self.refused):
            if version not in wanted:
                del self.refused[version]  # the alias left it: it may be tried again when it comes back
        for version in wanted:
            wait = self.waiting.get(version)
            if version in self.loaded or version in self.refused or (wait and now < (wait.retry_at or 0)):
                continue
            # said before the load, which may take minutes: the controller sees this replica follow at once
            self.link.report(self.replica, self.actual(epoch=d.epoch, loading=version))
            if self._try(version, d.refs[version]) is not None and version == d.champion:
                d = self.link.state(fresh=True)  # the alias again, right before the swap: a move back wins
        target = self.loaded.get(d.champion) if d.champion else None
        if target is not None and target is not self.current:
            old, self.current = self.current, target  # the one atomic swap; running batches keep `old`
            self.swaps += 1
            log.info("swapped %s -> %s", old.ref.describe(), target.ref.describe())
        self.canary = self.loaded.get(d.canary) if d.canary else None
        self.shadow = self.loaded.get(d.shadow) if d.shadow else None
        keep = set(d.wanted(time.time())) | {_key(self.current.ref.version)}
        for version in [v for v in self.loaded if v not in keep]:
            del self.loaded[version]
            self.footprints.pop(version, None)
        self.behind_since = None if d.champion in (None, _key(self.current.ref.version)) else (self.behind_since or now)
        self.declared = d
        self.link.report(self.replica, self.actual(epoch=d.epoch))

    # --- what it says -----------------------------------------------------------------------------
    @property
    def serving_last_known_good(self) -> bool:
        d = self.declared
        return d.champion != _key(self.current.ref.version) and _key(self.current.ref.version) == d.last_known_good

    def behind_for(self) -> float:
        """Seconds this replica has served something other than the declared champion."""
        return 0.0 if self.behind_since is None else time.time() - self.behind_since

    def last_error(self) -> SwapError | None:
        errors = [e for e in (*self.refused.values(), *self.waiting.values())]
        return max(errors, key=lambda e: e.at) if errors else None

    def actual(self, epoch: int | None = None, loading: str | None = None) -> dict[str, Any]:
        """What this replica serves and holds; `epoch`: the controller's declaration it has taken,
        `loading`: the version it is loading now."""
        err = self.last_error()
        return {"serving": _key(self.current.ref.version), "loaded": sorted(self.loaded, key=str),
                "epoch": self.declared.epoch if epoch is None else epoch, "loading": loading,
                "canary": None if self.canary is None else _key(self.canary.ref.version),
                "shadow": None if self.shadow is None else _key(self.shadow.ref.version),
                "serving_last_known_good": self.serving_last_known_good, "behind_s": self.behind_for(),
                "last_error": None if err is None else {"version": err.version, "error": err.error, "at": err.at,
                                                        "retry_at": err.retry_at},
                "node": os.uname().nodename, "pid": os.getpid(),
                # whether the next version would fit beside those held (the check a swap makes)
                "memory": swap_room(resident_bytes(), max(self.footprints.values(), default=0), self.reserved_bytes)}

    def status(self) -> dict[str, Any]:
        err = self.last_error()
        current = self.current
        return {
            **current.info(),
            "metrics": self.run_metrics.get(_key(current.ref.version), {}),
            # the registry version's tags (train/register stages): data_dvc_md5, data_manifest_sha256, git_commit
            "data_version": {**current.info()["data_version"],
                             **{k: v for k, v in current.ref.tags.items() if k.startswith(("data_", "git_"))}},
            # the forward's threads (Ray sets OMP_NUM_THREADS from the replica's num_cpus)
            "torch_threads": torch.get_num_threads() if self.forward is None else self.forward.threads,
            "following": self.cfg.model_uri,
            "declared_champion": self.declared.champion,
            "serving_last_known_good": self.serving_last_known_good,
            "self_test": self.checked.get(_key(current.ref.version)),
            "poll_s": self.poll_s,
            "last_check": self.last_check,
            "swaps": self.swaps,
            "last_swap_error": None if err is None else {"version": err.version, "error": err.error, "at": err.at,
                                                         "retry_at": err.retry_at},
        }

