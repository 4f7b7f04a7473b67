"""Teacher checkpoints from s3:// or MLflow (models:/, runs:/) for nodes without internet or a shared
filesystem: each node fetches the pinned file once into its cache and the teacher loads it from there.

A fetch downloads into a temporary folder of the cache, checks the sha256 pin, and only then renames
the file to `<cache_dir>/<sha256>/<name>`, under a per-hash file lock, so two workers of one node
download it once and nothing half-written or unverified is ever found in the cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from plantad.config import REMOTE_WEIGHTS, S3Config, Settings
from plantad.models.factory import build_model
from plantad.models.interface import AnomalyModel
from plantad.models.safe_load import file_sha256

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class TeacherWeightsError(RuntimeError):
    """Remote teacher weights that cannot be fetched, or whose bytes do not match the pin."""


def is_remote(weights: str) -> bool:
    return weights.startswith(REMOTE_WEIGHTS)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "plantad" / "teachers"


def teacher_key(settings: Settings) -> str:
    """The settings section of the teacher the configured method builds (one per model)."""
    model = settings.model
    uses_cnn = model.method in ("snl_rd", "snl_fd") and model.snl.teacher == "cnn"
    return "model.snl.cnn_teacher" if uses_cnn else "model.teacher"


def fetch_teacher_file(weights: str, sha256: str, cache_dir: Path, s3: S3Config, tracking_uri: str | None,
                       key: str = "model.teacher") -> Path:
    """The local, verified copy of remote `weights`: from the cache, else downloaded once."""
    from filelock import FileLock

    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f".{sha256}.lock")):
        cached = _cached_file(cache_dir / sha256, sha256)
        if cached is not None:
            log.info("teacher %s: using the cached copy %s", weights, cached)
            return cached
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
        try:
            file = _download(weights, tmp, s3, tracking_uri)
            actual = file_sha256(file)
            if actual != sha256.lower():
                raise TeacherWeightsError(f"refusing teacher weights {weights}: their sha256 is {actual} but "
                                          f"{key}.sha256 pins {sha256}; nothing was cached")
            (cache_dir / sha256).mkdir(exist_ok=True)
            target = cache_dir / sha256 / file.name
            os.replace(file, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("teacher %s: downloaded and verified into %s", weights, target)
    return target


def _cached_file(folder: Path, sha256: str) -> Path | None:
    """The one file in `folder` when its hash still matches; a damaged copy is removed (re-fetched)."""
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if len(files) == 1 and file_sha256(files[0]) == sha256.lower():
        return files[0]
    log.warning("teacher cache %s does not hold one file with sha256 %s; fetching it again", folder, sha256)
    shutil.rmtree(folder)
    return None


def _download(weights: str, dest: Path, s3: S3Config, tracking_uri: str | None) -> Path:
    if weights.startswith("s3://"):
        return _download_s3(weights, dest, s3)
    return _download_mlflow(weights, dest, tracking_uri)


def _download_s3(uri: str, dest: Path, s3: S3Config) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    from plantad.tracking.s3 import endpoint_name, s3_client, split_s3_uri

    bucket, key = split_s3_uri(uri)
    target = dest / Path(key).name
    try:
        s3_client(s3).download_file(bucket, key, str(target))
    except (BotoCoreError, ClientError) as exc:
        raise TeacherWeightsError(f"cannot download teacher weights {uri} from {endpoint_name(s3)} "
                                  f"(s3.endpoint_url): {exc}") from exc
    return target


def _download_mlflow(uri: str, dest: Path, tracking_uri: str | None) -> Path:
    import mlflow.artifacts
    from mlflow import MlflowClient

    from plantad.tracking.model_source import parse_registry_uri

    if not tracking_uri:
        raise TeacherWeightsError(f"teacher weights {uri} need an MLflow tracking store: set mlflow.tracking_uri "
                                  "or MLFLOW_TRACKING_URI")
    try:
        source = uri
        parsed = parse_registry_uri(uri)
        if parsed is not None:  # the version's own artifacts, not the global registry URI
            client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            name, alias, version = parsed
            version = client.get_model_version_by_alias(name, alias).version if alias else version
            source = client.get_model_version_download_uri(name, version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest),
                                                         tracking_uri=tracking_uri))
    except Exception as exc:  # MLflow, S3 and HTTP errors: all mean "cannot fetch these weights"
        raise TeacherWeightsError(f"cannot download teacher weights {uri} from {tracking_uri}: {exc}") from exc
    return local if local.is_file() else _one_weights_file(local, uri)


def _one_weights_file(folder: Path, uri: str) -> Path:
    found = [p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    if len(found) != 1:
        names = sorted(p.name for p in found)
        raise TeacherWeightsError(f"teacher weights {uri} hold {len(found)} checkpoint files {names}, expected "
                                  f"one ({', '.join(WEIGHT_SUFFIXES)}); point at the file with runs:/<run>/<path>")
    return found[0]


def localize_teachers(settings: Settings, tracking_uri: str | None = None) -> tuple[Settings, dict[str, str]]:
    """Settings whose used teacher's remote weights are replaced by the node's verified cached file,
    and {cached path: remote URI} so that the model's teacher identity can name the URI."""
    key = teacher_key(settings)
    cfg = settings.model.snl.cnn_teacher if key == "model.snl.cnn_teacher" else settings.model.teacher
    if not is_remote(cfg.weights):
        return settings, {}
    assert cfg.sha256 is not None  # the config requires a pin for remote weights
    if tracking_uri is None:
        from plantad.tracking.store import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(settings.mlflow, Path.cwd())
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    local = fetch_teacher_file(cfg.weights, cfg.sha256, cache, settings.s3, tracking_uri, key)
    updated = settings.model_copy(deep=True)
    section: Any = updated.model.snl.cnn_teacher if key == "model.snl.cnn_teacher" else updated.model.teacher
    section.weights = str(local)
    return updated, {str(local): cfg.weights}


def name_remote_source(identity: Any, sources: dict[str, str]) -> Any:
    """The teacher identity with the remote URI it was configured by instead of the cache path."""
    return replace(identity, weights=sources[identity.weights]) if identity.weights in sources else identity


def build_model_with_teacher_weights(settings: Settings, tracking_uri: str | None = None) -> AnomalyModel:
    """`build_model` with the used teacher's remote weights fetched first into this node's verified cache
    (the models read local files only); the teacher identity names the remote URI, not the cache path.
    `tracking_uri` resolves models:/ and runs:/ weights (None: mlflow.tracking_uri, else the project's)."""
    local, sources = localize_teachers(settings, tracking_uri)
    model = build_model(local)
    model.teacher.identity = name_remote_source(model.teacher.identity, sources)
    return model
