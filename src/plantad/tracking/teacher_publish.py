"""`plantad teacher publish`: put a teacher checkpoint where air-gapped nodes can fetch it (the plant's
S3 or MLflow) and print the params.yaml lines that pin it by sha256.

The file is checked before it is uploaded: it must be a plain weights file (safetensors, or a torch
file that `weights_only=True` reads) and match its `.sha256` sidecar when it has one. A published
object is never overwritten: the same bytes are left as they are, different bytes are refused.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from plantad.config import MlflowConfig, S3Config
from plantad.models.safe_load import UnverifiedFileError, file_sha256, load_weights, sidecar_sha256, verify_sha256

log = logging.getLogger(__name__)

SHA256_METADATA = "sha256"  # S3 object metadata (x-amz-meta-sha256) of a published checkpoint
_CONFLICT_RETRIES = 3  # S3 answers 409 to a conditional put racing another one; it is retried


class PublishError(RuntimeError):
    """A checkpoint that cannot be published as asked; nothing was uploaded."""


def checked_checkpoint(path: Path) -> str:
    """sha256 of a readable plain-weights checkpoint (matching its sidecar, if any)."""
    if not path.is_file():
        raise PublishError(f"teacher checkpoint {path} does not exist")
    try:
        recorded = sidecar_sha256(path)
        digest = verify_sha256(path, recorded, f"{path.name}.sha256") if recorded else file_sha256(path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        else:
            load_weights(path)
    except UnverifiedFileError as exc:
        raise PublishError(str(exc)) from exc
    except Exception as exc:  # safetensors' and torch's own errors for foreign or truncated files
        raise PublishError(f"{path} is not a readable checkpoint ({exc}); nothing was published") from exc
    return digest


def publish_to_s3(path: Path, prefix: str, s3: S3Config, digest: str) -> str:
    """Upload to `<prefix>/<file name>` with the hash as object metadata; returns the object URI.

    The put is conditional (`If-None-Match: *`): the store itself refuses it when the key exists, so
    of two publishers racing to one key exactly one writes and the other compares hashes (the same
    bytes: the object is left as it is; other bytes: refused, naming the key). No existence check
    comes first: it would open a window between check and write. A single PUT, so up to 5 GB."""
    from botocore.exceptions import BotoCoreError, ClientError

    from plantad.tracking.s3 import endpoint_name, s3_client, split_s3_uri

    bucket, folder = split_s3_uri(prefix)
    key = f"{folder}/{path.name}" if folder else path.name
    uri = f"s3://{bucket}/{key}"
    client = s3_client(s3)
    try:
        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                with path.open("rb") as body:
                    client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*",
                                      Metadata={SHA256_METADATA: digest})
                return uri
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("ConditionalRequestConflict", "409") and attempt < _CONFLICT_RETRIES:
                    time.sleep(0.5 * (attempt + 1))  # another upload to the key is in progress: see who wins
                    continue
                if code in ("NotImplemented", "501"):
                    raise PublishError(f"the S3 endpoint {endpoint_name(s3)} does not support conditional writes "
                                       f"(If-None-Match), which publishing {uri} without overwriting needs; "
                                       "nothing was published") from exc
                if code not in ("PreconditionFailed", "412"):
                    raise
            _same_or_refused(client, bucket, key, uri, digest)
            return uri
        raise PublishError(f"{uri}: another upload to this key kept conflicting; nothing was published")
    except (BotoCoreError, ClientError) as exc:
        raise PublishError(f"cannot upload {path} to {uri} at {endpoint_name(s3)}: {exc}") from exc


def _same_or_refused(client, bucket: str, key: str, uri: str, digest: str) -> None:
    """The key exists: fine when it holds these bytes (by its recorded sha256), else PublishError."""
    stored = client.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get(SHA256_METADATA)
    if stored == digest:
        log.info("%s already holds this checkpoint; not uploaded again", uri)
        return
    raise PublishError(f"{uri} already exists with other bytes (sha256 {stored or 'not recorded'}, this "
                       f"file's is {digest}); it is left as it is: publish under another prefix or name")


def publish_to_mlflow(path: Path, tracking_uri: str, cfg: MlflowConfig, name: str, digest: str) -> str:
    """Log the file in a run of `<mlflow.experiment>-teachers` and register it as a new version of
    `name`; returns `models:/<name>/<version>`."""
    from mlflow import MlflowClient

    from plantad.tracking.registry import _ensure_registered_model
    from plantad.tracking.store import ensure_experiment

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    location = f"{cfg.artifact_location.rstrip('/')}-teachers" if cfg.artifact_location else None
    teachers = MlflowConfig(experiment=f"{cfg.experiment}-teachers", artifact_location=location)
    run = client.create_run(ensure_experiment(client, teachers),
                            tags={"plantad.stage": "teacher-publish", "teacher.sha256": digest,
                                  "teacher.file": path.name})
    run_id = run.info.run_id
    try:
        client.log_artifact(run_id, str(path), "teacher")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    _ensure_registered_model(client, name)
    version = client.create_model_version(name, f"runs:/{run_id}/teacher", run_id=run_id,
                                          tags={"sha256": digest, "file": path.name})
    return f"models:/{name}/{version.version}"


def params_lines(which: str, weights: str, digest: str) -> str:
    """The params.yaml lines that select and pin the published checkpoint (the hash quoted: YAML
    would read an all-digit one as a number)."""
    if which == "cnn":
        return f'model:\n  snl:\n    cnn_teacher:\n      weights: {weights}\n      sha256: "{digest}"\n'
    return f'model:\n  teacher:\n    weights: {weights}\n    sha256: "{digest}"\n'
