"""A loaded model version with its own settings and image transform: what the Ray Serve replicas,
the bulk-scoring actors and the MLflow pyfunc model each hold one of.

Scores come from `plantad.scoring.score_batch` only; this class adds decoding, batching to the
model's `scoring.batch_size` and the identity of the version that scored (name, version, threshold).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from plantad.config import Settings, settings_from_dict
from plantad.data.images import ImageTransform
from plantad.evaluation.drift import DriftReference
from plantad.models.checkpoint import META_FILE, load_model, recorded_sha256
from plantad.models.exported import for_scoring, runtime_of
from plantad.scoring import ScoreOutput, score_batch
from plantad.tracking.model_source import ModelRef, download_model, resolve_model


@dataclass(frozen=True)
class ImageScore:
    """One image's result; the raw scores and branch probabilities are None for an absent branch."""

    probability: float
    is_anomalous: bool
    p_local: float | None
    p_semantic: float | None
    local_score: float | None
    semantic_score: float | None
    threshold: float
    anomaly_map: np.ndarray | None = None  # (S, S) float32 at model input size, when asked for
    embedding: np.ndarray | None = None  # (C,) float32 teacher embedding, for the line-health drift test


@dataclass(frozen=True)
class Prepared:
    """A decoded image with its model input computed ahead of its batch (a replica does it on a
    decode thread, while the previous batch's forward runs). A version of another input size
    transforms the image again."""

    image: Image.Image
    input: torch.Tensor  # (3, S, S) float32: ImageTransform(S)(image)


def prepare(images: list[Image.Image], transform: ImageTransform) -> list[Prepared]:
    return [Prepared(img, transform(img)) for img in images]


def _value(t: torch.Tensor | None, i: int) -> float | None:
    return None if t is None else float(t[i])


def split_scores(out: ScoreOutput, threshold: float, with_maps: bool) -> list[ImageScore]:
    maps = out.anomaly_map.float().cpu().numpy() if with_maps and out.local_score is not None else None
    embeddings = None if out.embedding is None else out.embedding.float().cpu().numpy()
    return [
        ImageScore(
            probability=float(out.probability[i]),
            is_anomalous=bool(out.is_anomalous[i]),
            p_local=_value(out.p_local, i),
            p_semantic=_value(out.p_semantic, i),
            local_score=_value(out.local_score, i),
            semantic_score=_value(out.semantic_score, i),
            threshold=threshold,
            anomaly_map=None if maps is None else maps[i],
            embedding=None if embeddings is None else embeddings[i],
        )
        for i in range(out.probability.shape[0])
    ]


class Predictor:
    def __init__(self, model: nn.Module, meta: dict[str, Any], ref: ModelRef, model_dir: Path) -> None:
        """`model_dir` is where the version was loaded from (gone after a temporary download)."""
        self.model = model
        self.meta = meta
        self.ref = ref
        self.model_dir = model_dir
        self.settings: Settings = settings_from_dict(meta["settings"], source=f"{ref.describe()} metadata")
        self.transform = ImageTransform(self.settings.data.image_size)
        self.device = next(model.parameters()).device
        self.loaded_at = time.time()
        stored = meta.get("drift_reference")  # fitted at calibration; models saved before it have none
        self.drift_reference: DriftReference | None = None if stored is None else DriftReference.from_dict(stored)

    @classmethod
    def load(cls, uri: str, tracking_uri: str | None = None, device: str = "auto", cache_dir: Path | None = None,
             client: Any = None, graph_cache: Path | None = None, runtime: str | None = None) -> Predictor:
        """Resolve `uri` (registry URI or model folder) to one version, download it and load it;
        `graph_cache`: where `scoring.runtime: openvino` keeps exported graphs (default: the node's);
        `runtime`: torch or openvino instead of the version's own `scoring.runtime`."""
        if client is None and uri.startswith("models:/"):
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri)
        ref = resolve_model(uri, client)
        return cls.from_ref(ref, tracking_uri, device, cache_dir, graph_cache, runtime)

    @classmethod
    def from_ref(cls, ref: ModelRef, tracking_uri: str | None, device: str = "auto",
                 cache_dir: Path | None = None, graph_cache: Path | None = None,
                 runtime: str | None = None) -> Predictor:
        from plantad.models.device import resolve_device

        with contextlib.ExitStack() as stack:
            if cache_dir is None and ref.registered:  # the weights end up in memory: leave no download behind
                cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="plantad-model-")))
            model_dir = download_model(ref, tracking_uri, cache_dir)
            model, meta = load_model(model_dir, device=resolve_device(device))
            predictor = cls(model, meta, ref, model_dir)
            if runtime is not None:  # the serving fleet's choice, not the trainer's
                scoring = predictor.settings.scoring.model_copy(update={"runtime": runtime})
                predictor.settings = predictor.settings.model_copy(update={"scoring": scoring})
            predictor.model = for_scoring(model, predictor.settings.scoring, recorded_sha256(model_dir / META_FILE),
                                          graph_cache)
        return predictor

    @property
    def threshold(self) -> float:
        return float(self.model.noisy_or.threshold)

    @property
    def image_size(self) -> int:
        return self.settings.data.image_size

    @property
    def lambda_local(self) -> float:
        return float(self.model.noisy_or.lambda_local)

    def info(self) -> dict[str, Any]:
        """What scored: the version, its threshold, teacher and data version (for /model and tables)."""
        return {
            "name": self.ref.name,
            "version": self.ref.version,
            "alias": self.ref.alias,
            "uri": self.ref.version_uri,
            "run_id": self.ref.run_id,
            "threshold": self.threshold,
            "image_size": self.image_size,
            "method": self.meta.get("method"),
            "branches": self.meta.get("branches"),
            "teacher": self.meta.get("teacher"),
            "data_version": self.meta.get("lineage", {}),
            "device": str(self.device),
            "runtime": runtime_of(self.model),
            "loaded_at": self.loaded_at,
        }

    def model_input(self, image: Image.Image | Prepared) -> torch.Tensor:
        """The (3, S, S) input of an RGB image, or of a prepared one (computed again at another size)."""
        if isinstance(image, Prepared):
            if image.input.shape[-1] == self.image_size:
                return image.input
            image = image.image
        return self.transform(image)

    def score(self, images: list[Image.Image | Prepared], threshold: float | None = None,
              with_maps: bool = False) -> list[ImageScore]:
        """Score RGB images in chunks of `scoring.batch_size`; `threshold` overrides the stored one."""
        thr = self.threshold if threshold is None else float(threshold)
        results: list[ImageScore] = []
        step = self.settings.scoring.batch_size
        for start in range(0, len(images), step):
            x = torch.stack([self.model_input(img) for img in images[start:start + step]])
            out = score_batch(self.model, x, self.settings.scoring, threshold=threshold, amp=self.settings.train.amp)
            results.extend(split_scores(out, thr, with_maps))
        return results

    def warm_up(self) -> None:
        """One forward on a full chunk (`scoring.batch_size`) of grey images, so that no request
        pays for lazy initialisation or for the first touch of the largest batch's memory."""
        grey = Image.new("RGB", (self.image_size, self.image_size), (128, 128, 128))
        self.score([grey] * self.settings.scoring.batch_size)
