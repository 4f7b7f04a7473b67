"""Where a model to score with comes from: a registry URI (`models:/name@alias`, `models:/name/3`)
or a local model directory, resolved to one exact version before anything is loaded.

Serving and bulk scoring resolve the alias once and then load that version by number, so a
promotion that lands while a model downloads can never mix two versions in one answer or table.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from plantad.models.checkpoint import META_FILE, MODEL_FILE, SHA256_KEY, recorded_sha256
from plantad.models.safe_load import file_sha256

if TYPE_CHECKING:
    from mlflow import MlflowClient

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ModelSourceError(RuntimeError):
    """A model URI that cannot be resolved or downloaded; names the URI and the tracking store."""


class ModelFetchError(ModelSourceError):
    """The store did not deliver a version (network, S3, tracking server): worth trying again."""


@dataclass(frozen=True)
class ModelRef:
    """One exact model: a registered version (name, version, the alias it was reached by) or a folder."""

    uri: str  # as the user gave it
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    local_dir: Path | None = None  # set for a model directory given directly

    @property
    def registered(self) -> bool:
        return self.local_dir is None

    @property
    def version_uri(self) -> str:
        """`models:/name/version` (pinned), or the directory."""
        return f"models:/{self.name}/{self.version}" if self.registered else str(self.local_dir)

    def describe(self) -> str:
        if not self.registered:
            return f"model directory {self.local_dir}"
        via = f" (@{self.alias})" if self.alias else ""
        return f"{self.name} v{self.version}{via}"


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of `models:/name@alias` or `models:/name/N`; None for anything else."""
    m = _REGISTRY_URI.match(uri.strip())
    return None if m is None else (m["name"], m["alias"], m["version"])


def resolve_model(uri: str, client: MlflowClient | None) -> ModelRef:
    """Pin `uri` to one version now (an alias is looked up once); a folder must hold model.pt."""
    parsed = parse_registry_uri(uri)
    if parsed is None:
        if uri.startswith(("models:/", "runs:/")):
            raise ModelSourceError(f"model URI {uri!r} is not models:/<name>@<alias> or models:/<name>/<version>")
        path = Path(uri)
        if not (path / MODEL_FILE).is_file():
            raise ModelSourceError(f"{path} is not a model directory (no {MODEL_FILE}); give one written by "
                                   "`plantad train` or the train stage, or a models:/<name>@<alias> URI")
        return ModelRef(uri=uri, local_dir=path.resolve())
    if client is None:
        raise ModelSourceError(f"{uri} needs an MLflow tracking store")
    from mlflow.exceptions import MlflowException

    name, alias, version = parsed
    where = f"in the MLflow registry at {client.tracking_uri}"
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        what = f"alias '{alias}'" if alias else f"version {version}"
        raise ModelSourceError(f"{name} has no {what} {where} ({exc.error_code}); register a model with "
                               "`dvc repro`, then set the alias in the MLflow UI") from exc
    return ModelRef(uri=uri, name=name, version=str(mv.version), alias=alias, run_id=mv.run_id, tags=dict(mv.tags))


def find_model_dir(root: Path) -> Path:
    """The plantad model directory (holding model.pt) inside a downloaded MLflow model."""
    found = sorted(p.parent for p in Path(root).rglob(MODEL_FILE))
    if len(found) != 1:
        raise ModelSourceError(f"expected one {MODEL_FILE} in the downloaded model at {root}, found {len(found)}")
    return found[0]


def download_model(ref: ModelRef, tracking_uri: str | None, cache_dir: Path | None = None) -> Path:
    """Local model directory of `ref`: the folder itself, or the version's artifacts downloaded.

    A version is immutable, so its entry in `cache_dir` (cache_entry) is reused once complete, and
    one process per node downloads it (a file lock); without a `cache_dir` the download goes to a
    new temporary folder that the caller owns.
    """
    if not ref.registered:
        assert ref.local_dir is not None
        return ref.local_dir
    import mlflow.artifacts
    from mlflow import MlflowClient

    from filelock import FileLock

    dest_root = Path(cache_dir or tempfile.mkdtemp(prefix="plantad-model-"))
    dest = cache_entry(dest_root, ref)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # one download per node: replicas of several apps on one node share the cache, the first fetches
    with FileLock(str(dest) + ".lock"):
        if (dest / ".complete").is_file():
            os.utime(dest / ".complete")  # last use, for prune_cache
            return find_model_dir(dest)
        shutil.rmtree(dest, ignore_errors=True)  # a download cut short by a crash
        dest.mkdir(parents=True)
        try:  # the version's own source: the registry URI would go through the global registry URI
            source = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(
                ref.name, ref.version)
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest), tracking_uri=tracking_uri)
        except Exception as exc:  # MLflow, S3 and HTTP errors: all mean "cannot fetch this version"
            raise ModelFetchError(f"cannot download {ref.describe()} from {tracking_uri}: {exc}") from exc
        model_dir = find_model_dir(dest)
        check_registered_sha256(ref, model_dir)
        (dest / ".complete").write_text(ref.version_uri)
    return model_dir


META_SHA256_TAG = "model_json_sha256"  # version tag: sha256 of the registered model.json (which pins model.pt's)


def registration_tags(model_dir: Path) -> dict[str, str]:
    """The hashes the register stage tags a version with: model.pt's (as model.json records it) and
    model.json's own, so a node can key its cache by them and check what the store delivers."""
    meta = Path(model_dir) / META_FILE
    pt = recorded_sha256(meta)
    if pt is None:
        raise ModelSourceError(f"{meta} records no {SHA256_KEY}: save the model with `plantad train` first")
    return {SHA256_KEY: pt, META_SHA256_TAG: file_sha256(meta)}


def _tag_sha256(ref: ModelRef, key: str) -> str | None:
    value = ref.tags.get(key, "").strip().lower()
    return value if _SHA256.match(value) else None


def registered_sha256(ref: ModelRef) -> str | None:
    """model.pt's sha256 as the register stage tagged the version (`model_sha256`); None for versions
    registered without it."""
    return _tag_sha256(ref, SHA256_KEY)


def check_registered_sha256(ref: ModelRef, model_dir: Path) -> None:
    """The downloaded files are the ones registered: model.json hashes to the version's tag and records
    the tagged model.pt hash (loading then checks model.pt against model.json)."""
    if registered_sha256(ref) is None and _tag_sha256(ref, META_SHA256_TAG) is None:
        return  # registered before the tags: loading still checks model.pt against model.json
    meta = model_dir / META_FILE
    found = {META_SHA256_TAG: file_sha256(meta) if meta.is_file() else None, SHA256_KEY: recorded_sha256(meta)}
    for key, what in ((META_SHA256_TAG, "model.json"), (SHA256_KEY, "model.pt")):
        tagged = _tag_sha256(ref, key)
        if tagged is not None and found[key] != tagged:
            raise ModelSourceError(f"{ref.describe()} was registered with {what} sha256 {tagged}, but the files "
                                   f"the store delivered give {found[key] or 'no hash'}: the artifact was replaced or "
                                   "damaged after registration; register the model again")


def cache_entry(cache_dir: Path, ref: ModelRef) -> Path:
    """Where `ref` lives in a node's cache, keyed by the sha256 of its model.json (the version's
    `model_json_sha256` tag; model.json pins model.pt's hash): versions or registries with the same
    files share one copy, and a version number that means other files in another registry never
    hits it. Versions registered without the tag fall back to their version and run id."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", ref.name or "model")
    digest = _tag_sha256(ref, META_SHA256_TAG)
    if digest is not None:
        return Path(cache_dir) / safe / f"sha256-{digest}"
    return Path(cache_dir) / safe / f"{ref.version}-{(ref.run_id or 'norun')[:16]}"


def prune_cache(folder: Path, keep: int) -> None:
    """Keep the `keep` most recently used complete versions of one model in the node's cache; an
    entry another process is downloading (its lock held) is left alone."""
    from filelock import FileLock, Timeout

    done = sorted((p for p in folder.iterdir() if (p / ".complete").is_file()),
                  key=lambda p: (p / ".complete").stat().st_mtime, reverse=True)
    for old in done[keep:]:
        try:
            with FileLock(str(old) + ".lock", timeout=0):
                shutil.rmtree(old, ignore_errors=True)
        except Timeout:
            continue
