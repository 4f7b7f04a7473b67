"""The model a replica serves, and how it follows the registry alias without losing capacity.

A daemon thread polls `resolve_model(models:/<name>@<alias>)` every `alias_poll_s` (a webhook can
wake it early). On a new version it loads a second Predictor beside the serving one, warms it up,
self-tests it on the golden image and then swaps one reference. A batch reads the reference once
at its start, so requests in flight finish on the version they started with and none fails. A
version that cannot be swapped in is reported (`status()["last_swap_error"]`) and the old one keeps
serving. One that could not be fetched (store or network down) is tried again with a backoff, so no
replica stays behind after a blip; one that loads but is broken is not retried until the alias moves.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from plantad.serving.predictor import Predictor
from plantad.tracking.model_source import ModelFetchError, ModelRef, resolve_model

log = logging.getLogger(__name__)
MAX_RETRY_S = 300.0  # longest wait between two fetches of a version that could not be fetched


class SelfTestError(RuntimeError):
    """A newly loaded version whose answer on the golden image is unusable."""


@dataclass(frozen=True)
class SwapError:
    version: str | None
    error: str
    at: float
    retry_at: float | None = None  # set when the version could not be fetched and will be tried again
    failures: int = 1


def golden_image(path: str | None) -> Image.Image:
    """The self-test image: `path`, else the one packaged with plantad (a demo weave, 64 px)."""
    data = Path(path).read_bytes() if path else resources.files("plantad.serving").joinpath("golden.png").read_bytes()
    return Image.open(io.BytesIO(data)).convert("RGB")


def self_test(predictor: Predictor, image: Image.Image) -> float:
    """Score the golden image twice: the probability must be finite, in [0, 1] and repeatable."""
    first, second = predictor.score([image, image.copy()])
    p = first.probability
    if not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise SelfTestError(f"{predictor.ref.describe()} gives probability {p} on the golden image")
    if abs(p - second.probability) > 1e-5:
        raise SelfTestError(f"{predictor.ref.describe()} is not deterministic on the golden image "
                            f"({p} then {second.probability})")
    return p


class ModelHolder:
    """One serving Predictor, swapped atomically by a background poller."""

    def __init__(self, uri: str, tracking_uri: str | None, device: str, poll_s: float,
                 golden: Image.Image, cache_dir: Path | None = None, runtime: str | None = None) -> None:
        self.uri, self.tracking_uri, self.device, self.poll_s = uri, tracking_uri, device, poll_s
        self.golden, self.cache_dir, self.runtime = golden, cache_dir, runtime
        self._client = self._mlflow_client()
        self.run_metrics: dict[str, dict[str, float | None]] = {}
        self.current: Predictor = self._load(resolve_model(uri, self._client))  # fails the replica start
        self.last_swap_error: SwapError | None = None
        self.last_check: float = time.time()
        self.swaps = 0
        self._failed_version: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_forever, name="plantad-alias-poller", daemon=True)
        self._thread.start()

    def _mlflow_client(self) -> Any:
        if not self.uri.startswith("models:/"):
            return None
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)

    def _load(self, ref: ModelRef) -> Predictor:
        started = time.perf_counter()
        metrics = self._run_metrics(ref)  # before the download: a registry that fails here fails cheaply
        predictor = Predictor.from_ref(ref, self.tracking_uri, self.device, self.cache_dir, runtime=self.runtime)
        predictor.warm_up()
        p = self_test(predictor, self.golden)
        self.run_metrics[str(ref.version)] = metrics
        log.info("loaded %s in %.1f s (golden image p=%.4f)", ref.describe(), time.perf_counter() - started, p)
        return predictor

    def _run_metrics(self, ref: ModelRef) -> dict[str, float | None]:
        """The evaluation metrics of the run that produced the version (for /model)."""
        if self._client is None or not ref.run_id:
            return {}
        try:
            metrics = self._client.get_run(ref.run_id).data.metrics
        except Exception as exc:  # MLflow and HTTP errors: the tracking server did not answer
            raise ModelFetchError(f"cannot read run {ref.run_id} of {ref.describe()} from {self.tracking_uri}: "
                                   f"{exc}") from exc
        return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}  # JSON has no NaN

    def check_now(self) -> None:
        """Wake the poller (a webhook said the alias moved); the poll decides what to do."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.poll_once()

    def poll_once(self) -> None:
        """Resolve the alias; load, test and swap in a new version; record a failure, keep serving."""
        if self._client is None:
            return  # a fixed model folder: nothing to follow
        try:
            ref = resolve_model(self.uri, self._client)
        except Exception as exc:  # registry unreachable or alias deleted: keep serving, report it
            self.last_swap_error = SwapError(None, f"cannot resolve {self.uri}: {exc}", time.time())
            log.warning("%s", self.last_swap_error.error)
            return
        self.last_check = time.time()
        if self.last_swap_error is not None and self.last_swap_error.version is None:
            self.last_swap_error = None  # the registry answers again
        if ref.version in (self.current.ref.version, self._failed_version):
            return
        retry = self.last_swap_error
        if retry is not None and retry.version == ref.version and retry.retry_at and time.time() < retry.retry_at:
            return
        try:
            new = self._load(ref)
        except ModelFetchError as exc:  # not fetched: the store, not the version, may be at fault
            failures = retry.failures + 1 if retry is not None and retry.version == ref.version else 1
            now = time.time()
            retry_at = now + min(self.poll_s * 2 ** failures, MAX_RETRY_S)
            self.last_swap_error = SwapError(ref.version, f"{ref.describe()} not served yet: {exc}", now,
                                             retry_at, failures)
            log.warning("%s; still serving %s, trying again in %.0f s", self.last_swap_error.error,
                        self.current.ref.describe(), retry_at - now)
            return
        except Exception as exc:  # the version itself cannot be built or fails its self-test: keep the old one
            self._failed_version = ref.version
            self.last_swap_error = SwapError(ref.version, f"{ref.describe()} not served: {type(exc).__name__}: "
                                                          f"{exc}", time.time())
            log.error("%s; still serving %s", self.last_swap_error.error, self.current.ref.describe())
            return
        old, self.current = self.current, new  # the one atomic swap; batches already running keep `old`
        self._failed_version, self.last_swap_error = None, None
        self.swaps += 1
        log.info("swapped %s -> %s", old.ref.describe(), new.ref.describe())

    def status(self) -> dict[str, Any]:
        err = self.last_swap_error
        return {
            **self.current.info(),
            "metrics": self.run_metrics.get(str(self.current.ref.version), {}),
            # the registry version's tags (train/register stages): data_dvc_md5, data_manifest_sha256, git_commit
            "data_version": {**self.current.info()["data_version"],
                             **{k: v for k, v in self.current.ref.tags.items() if k.startswith(("data_", "git_"))}},
            "torch_threads": torch.get_num_threads(),  # Ray sets OMP_NUM_THREADS from the replica's num_cpus
            "following": self.uri,
            "poll_s": self.poll_s,
            "last_check": self.last_check,
            "swaps": self.swaps,
            "last_swap_error": None if err is None else {"version": err.version, "error": err.error, "at": err.at,
                                                         "retry_at": err.retry_at},
        }
