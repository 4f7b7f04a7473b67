"""One S3 endpoint (AWS, MinIO, Ceph, moto ...) for the DVC remote, MLflow artifacts and Ray Train.

Credentials always come from the standard AWS chain (env vars, ~/.aws files, AWS_PROFILE, instance
roles), never from settings. Each consumer finds a custom endpoint differently: boto3 takes
`endpoint_url`, MLflow reads MLFLOW_S3_ENDPOINT_URL, pyarrow's `S3FileSystem` takes
`endpoint_override` + `scheme` (it ignores AWS_ENDPOINT_URL; only `FileSystem.from_uri` reads it),
and DVC takes `endpointurl` in the remote's config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from plantad.config import S3Config

if TYPE_CHECKING:
    import pyarrow.fs
    from botocore.client import BaseClient


class StorageError(RuntimeError):
    """An S3 endpoint or bucket that cannot be used (unreachable, missing, forbidden)."""


class BucketNotFound(StorageError):
    """The endpoint answered, but the bucket does not exist."""


def endpoint_name(cfg: S3Config) -> str:
    """How errors name the endpoint: its URL, or AWS S3 in the region."""
    return cfg.endpoint_url or f"AWS S3 ({cfg.region})"


def s3_client(cfg: S3Config) -> BaseClient:
    """A boto3 S3 client for the configured endpoint and region; short connect timeout, 3 tries."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=config)


def _required_bucket(cfg: S3Config, bucket: str | None) -> str:
    name = bucket or cfg.bucket
    if not name:
        raise StorageError("no bucket given and s3.bucket is not set in params.yaml")
    return name


def check_bucket(cfg: S3Config, bucket: str | None = None) -> str:
    """Raise StorageError naming the bucket and endpoint unless the bucket exists and is readable."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    name = _required_bucket(cfg, bucket)
    where = f"bucket '{name}' at {endpoint_name(cfg)}"
    try:
        s3_client(cfg).head_bucket(Bucket=name)
    except NoCredentialsError:
        raise StorageError(
            f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE or ~/.aws/credentials"
        ) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise BucketNotFound(f"{where} does not exist; create it (plantad.tracking.s3.ensure_bucket)") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise StorageError(f"access denied to {where}: check the credentials and the bucket policy") from None
        raise StorageError(f"{where} answered {code}: {exc}") from exc
    except BotoCoreError as exc:  # EndpointConnectionError, timeouts, bad URL ...
        raise StorageError(f"cannot reach {where} (s3.endpoint_url / s3.region): {exc}") from exc
    return name


def ensure_bucket(cfg: S3Config, bucket: str | None = None) -> str:
    """Create the bucket (s3.bucket unless given) when missing; returns its name."""
    name = _required_bucket(cfg, bucket)
    try:
        return check_bucket(cfg, name)
    except BucketNotFound:
        pass
    kwargs: dict = {"Bucket": name}
    if cfg.region != "us-east-1":  # S3 rejects an explicit us-east-1 location constraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": cfg.region}
    from botocore.exceptions import ClientError

    try:
        s3_client(cfg).create_bucket(**kwargs)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":  # a concurrent create
            raise StorageError(f"cannot create bucket '{name}' at {endpoint_name(cfg)}: {exc}") from exc
    return name


def storage_env(cfg: S3Config) -> dict[str, str]:
    """Env vars so subprocesses (DVC, MLflow, Ray workers, pyarrow's from_uri) use the endpoint.

    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL: boto3, s3fs (DVC) and `pyarrow.fs.FileSystem.from_uri`;
    MLFLOW_S3_ENDPOINT_URL: MLflow's S3 artifact store. No credentials: they stay in the AWS chain.
    """
    env = {"AWS_DEFAULT_REGION": cfg.region, "AWS_REGION": cfg.region}
    if cfg.endpoint_url:
        env.update({
            "AWS_ENDPOINT_URL": cfg.endpoint_url,
            "AWS_ENDPOINT_URL_S3": cfg.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": cfg.endpoint_url,
        })
    return env


def pyarrow_filesystem(cfg: S3Config) -> pyarrow.fs.S3FileSystem:
    """pyarrow S3 filesystem on the endpoint; credentials resolve where it is used (each Ray worker)."""
    import pyarrow.fs

    if not cfg.endpoint_url:
        return pyarrow.fs.S3FileSystem(region=cfg.region)
    parts = urlsplit(cfg.endpoint_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
        raise StorageError(f"s3.endpoint_url '{cfg.endpoint_url}' must look like http(s)://host[:port]")
    return pyarrow.fs.S3FileSystem(region=cfg.region, endpoint_override=parts.netloc, scheme=parts.scheme)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b/' -> ('bucket', 'a/b')."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise StorageError(f"'{uri}' is not an s3://bucket/prefix URI")
    return parts.netloc, parts.path.strip("/")


def resolve_storage(path: str, cfg: S3Config) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray Train's (storage_path, storage_filesystem): s3:// -> ('bucket/prefix', S3FileSystem).

    The bucket is checked here, on the driver, so a wrong endpoint or bucket fails before workers
    start. Local paths (and file://) come back absolute with no filesystem.
    """
    scheme = urlsplit(path).scheme
    if scheme == "s3":
        bucket, prefix = split_s3_uri(path)
        check_bucket(cfg, bucket)
        return (f"{bucket}/{prefix}" if prefix else bucket), pyarrow_filesystem(cfg)
    if scheme == "file":
        return str(Path(urlsplit(path).path).resolve()), None
    if scheme and len(scheme) > 1:  # one letter: a Windows drive, still a local path
        raise StorageError(f"storage path '{path}': only local folders and s3://bucket/prefix are supported")
    return str(Path(path).expanduser().resolve()), None
