"""plantad.tracking.s3 against moto's real S3 API on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.fs
import pytest
from infra.fixtures import free_port

from plantad.config import S3Config
from plantad.tracking.s3 import (
    BucketNotFound,
    StorageError,
    check_bucket,
    ensure_bucket,
    pyarrow_filesystem,
    resolve_storage,
    s3_client,
    storage_env,
)


def test_storage_env_names_the_endpoint_for_every_consumer(moto_s3: S3Config) -> None:
    env = storage_env(moto_s3)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
        assert env[key] == moto_s3.endpoint_url
    assert env["AWS_DEFAULT_REGION"] == env["AWS_REGION"] == "us-east-1"
    assert not any("KEY" in k or "TOKEN" in k for k in env)  # credentials stay in the AWS chain


def test_storage_env_for_aws_sets_only_the_region() -> None:
    assert storage_env(S3Config(region="eu-west-1")) == {"AWS_DEFAULT_REGION": "eu-west-1", "AWS_REGION": "eu-west-1"}


def test_resolve_storage_s3_gives_a_working_pyarrow_filesystem(moto_s3: S3Config) -> None:
    path, fs = resolve_storage(f"s3://{moto_s3.bucket}/ray/runs/", moto_s3)
    assert path == f"{moto_s3.bucket}/ray/runs"
    assert isinstance(fs, pyarrow.fs.S3FileSystem)
    with fs.open_output_stream(f"{path}/probe.bin") as f:
        f.write(b"\x00plantad\xff")
    body = s3_client(moto_s3).get_object(Bucket=moto_s3.bucket, Key="ray/runs/probe.bin")["Body"].read()
    assert body == b"\x00plantad\xff"
    assert resolve_storage(f"s3://{moto_s3.bucket}", moto_s3)[0] == moto_s3.bucket


def test_resolve_storage_local_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_storage("runs/ray", S3Config()) == (str(tmp_path / "runs" / "ray"), None)
    assert resolve_storage(f"file://{tmp_path}/x", S3Config()) == (str(tmp_path / "x"), None)
    with pytest.raises(StorageError, match="gs://b/p"):
        resolve_storage("gs://b/p", S3Config())


def test_missing_bucket_is_named_with_the_endpoint(moto_s3: S3Config) -> None:
    with pytest.raises(BucketNotFound) as err:
        resolve_storage("s3://no-such-bucket/ray", moto_s3)
    assert "no-such-bucket" in str(err.value) and moto_s3.endpoint_url in str(err.value)


def test_unreachable_endpoint_fails_fast_and_names_it() -> None:
    cfg = S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", bucket="plantad-test")
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        resolve_storage("s3://plantad-test/ray", cfg)
    assert "cannot reach" in str(err.value) and cfg.endpoint_url in str(err.value)
    assert "plantad-test" in str(err.value)
    assert time.monotonic() - start < 20


def test_missing_credentials_are_reported(moto_s3: S3Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probe on a laptop
    with pytest.raises(StorageError, match="no AWS credentials"):
        check_bucket(moto_s3)


def test_ensure_bucket_creates_once(moto_s3: S3Config) -> None:
    cfg = moto_s3.model_copy(update={"bucket": "plantad-fresh"})
    with pytest.raises(BucketNotFound):
        check_bucket(cfg)
    assert ensure_bucket(cfg) == "plantad-fresh"
    assert ensure_bucket(cfg) == "plantad-fresh"  # idempotent
    names = [b["Name"] for b in s3_client(cfg).list_buckets()["Buckets"]]
    assert names.count("plantad-fresh") == 1


def test_bucket_is_required() -> None:
    with pytest.raises(StorageError, match="s3.bucket"):
        ensure_bucket(S3Config(endpoint_url="http://127.0.0.1:9"))


def test_endpoint_with_a_path_is_rejected() -> None:
    with pytest.raises(StorageError, match="endpoint_url"):
        pyarrow_filesystem(S3Config(endpoint_url="http://minio.local:9000/some/path"))
