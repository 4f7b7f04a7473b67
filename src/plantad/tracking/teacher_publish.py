"""`plantad teacher publish`: put a teacher checkpoint where air-gapped nodes can fetch it (the plant's
S3 or MLflow) and print the params.yaml lines that pin it by sha256.

The file is checked before it is uploaded: it must be a plain weights file (safetensors, or a torch
file that `weights_only=True` reads) and match its `.sha256` sidecar when it has one. A published
object is never overwritten: the same bytes are left as they are, different bytes are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

from plantad.config import MlflowConfig, S3Config
from plantad.models.safe_load import UnverifiedFileError, file_sha256, load_weights, sidecar_sha256, verify_sha256

log = logging.getLogger(__name__)

SHA256_METADATA = "sha256"  # S3 object metadata (x-amz-meta-sha256) of a published checkpoint


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
    """Upload to `<prefix>/<file name>` with the hash as object metadata; returns the object URI."""
    from botocore.exceptions import BotoCoreError, ClientError

    from plantad.tracking.s3 import endpoint_name, s3_client, split_s3_uri

    bucket, folder = split_s3_uri(prefix)
    key = f"{folder}/{path.name}" if folder else path.name
    uri = f"s3://{bucket}/{key}"
    client = s3_client(s3)
    try:
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
                raise
        else:
            stored = head.get("Metadata", {}).get(SHA256_METADATA)
            if stored == digest:
                log.info("%s already holds this checkpoint; not uploaded again", uri)
                return uri
            raise PublishError(f"{uri} already exists with other bytes (sha256 {stored or 'not recorded'}, this "
                               f"file's is {digest}); it is left as it is: publish under another prefix or name")
        client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {SHA256_METADATA: digest}})
    except (BotoCoreError, ClientError) as exc:
        raise PublishError(f"cannot upload {path} to {uri} at {endpoint_name(s3)}: {exc}") from exc
    return uri


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
