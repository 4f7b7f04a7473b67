"""Air-gapped teacher weights: published to moto's S3 or an MLflow server, fetched once per node into
a verified cache, pinned by sha256 (match, mismatch, missing pin), never overwritten when published."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from plantad.config import ConfigError
from plantad.models.factory import build_model
from plantad.models.safe_load import file_sha256
from plantad.models.teacher import TeacherLoadError
from plantad.tracking.s3 import s3_client, split_s3_uri
from plantad.tracking.teacher_publish import PublishError, checked_checkpoint, publish_to_mlflow, publish_to_s3
from plantad.tracking.teacher_weights import TeacherWeightsError, build_model_with_teacher_weights
from teacher_files import tiny_teacher_file
from tiny import tiny_method_settings, tiny_settings

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def remote(weights: str, sha256: str, cache, *extra: str):
    return tiny_settings(f"model.teacher.weights={weights}", f"model.teacher.sha256={sha256}",
                         f"model.teacher.cache_dir={cache}", *extra)


@pytest.fixture
def published(tmp_path, moto_s3):
    """A tiny teacher published to a fresh prefix of the moto bucket: (uri, sha256, source net)."""
    path, net = tiny_teacher_file(tmp_path / "tiny_dinov2.safetensors")
    digest = checked_checkpoint(path)
    uri = publish_to_s3(path, f"s3://{moto_s3.bucket}/teachers-{uuid.uuid4().hex[:8]}", moto_s3, digest)
    return uri, digest, net


def endpoint(moto_s3) -> str:
    return f"s3.endpoint_url={moto_s3.endpoint_url}"


def test_a_pinned_s3_teacher_is_fetched_verified_and_recorded_by_its_uri(published, moto_s3, tmp_path):
    uri, digest, net = published
    model = build_model_with_teacher_weights(remote(uri, digest, tmp_path / "cache", endpoint(moto_s3)))
    identity = model.teacher.identity
    assert (identity.weights, identity.sha256, identity.source) == (uri, digest, "checkpoint")
    assert torch.equal(model.teacher.vit.blocks[1].attn.qkv.weight, net.blocks[1].attn.qkv.weight)
    cached = list((tmp_path / "cache").rglob("*.safetensors"))
    assert [p.relative_to(tmp_path / "cache").as_posix() for p in cached] == [f"{digest}/tiny_dinov2.safetensors"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".download-")]


def test_the_cache_is_reused_and_a_damaged_copy_is_fetched_again(published, moto_s3, tmp_path, caplog):
    uri, digest, _ = published
    settings = remote(uri, digest, tmp_path / "cache", endpoint(moto_s3))
    build_model_with_teacher_weights(settings)
    cached = tmp_path / "cache" / digest / "tiny_dinov2.safetensors"
    cached.write_bytes(cached.read_bytes()[:-8] + b"damaged!")
    with caplog.at_level(logging.WARNING):
        build_model_with_teacher_weights(settings)
    assert f"does not hold one file with sha256 {digest}" in caplog.text
    assert file_sha256(cached) == digest
    bucket, key = split_s3_uri(uri)
    s3_client(moto_s3).delete_object(Bucket=bucket, Key=key)  # the node no longer reaches the source
    assert build_model_with_teacher_weights(settings).teacher.identity.sha256 == digest  # served from the cache alone


def test_a_mismatched_pin_is_refused_naming_both_hashes_and_nothing_is_cached(published, moto_s3, tmp_path):
    uri, digest, _ = published
    wrong = "ab" * 32
    both = rf"{uri}: their sha256 is {digest} but model.teacher.sha256 pins {wrong}"
    with pytest.raises(TeacherWeightsError, match=both):
        build_model_with_teacher_weights(remote(uri, wrong, tmp_path / "cache", endpoint(moto_s3)))
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_the_model_itself_refuses_remote_weights_and_names_the_key(published, moto_s3, tmp_path):
    """models/ reads local files only: fetching is the caller's (training's, a script's) job."""
    uri, digest, _ = published
    settings = remote(uri, digest, tmp_path / "cache", endpoint(moto_s3))
    with pytest.raises(TeacherLoadError, match=rf"model.teacher.weights={uri} is remote: .* fetches it"):
        build_model(settings)
    assert not (tmp_path / "cache").exists()  # nothing was fetched
    assert build_model(settings, load_teacher_weights=False).teacher.identity.weights == uri  # a saved model's


def test_a_local_checkpoint_follows_the_pin_instead_of_a_sidecar(tmp_path):
    path, _ = tiny_teacher_file(tmp_path / "t.safetensors")
    digest = file_sha256(path)
    assert build_model(tiny_settings(f"model.teacher.weights={path}", f"model.teacher.sha256={digest}")
                       ).teacher.identity.sha256 == digest
    wrong = "f" * 64
    with pytest.raises(RuntimeError, match=rf"its sha256 is {digest} but model.teacher.sha256 records {wrong}"):
        build_model(tiny_settings(f"model.teacher.weights={path}", f"model.teacher.sha256={wrong}"))


def test_a_remote_teacher_without_a_pin_is_a_config_error_naming_the_key():
    for weights in ("s3://bucket/t.safetensors", "models:/teacher/1", "runs:/abc/teacher/t.pth"):
        required = rf"model.teacher.sha256 is required when model.teacher.weights is remote \({weights}\)"
        with pytest.raises(ConfigError, match=required):
            tiny_settings(f"model.teacher.weights={weights}")
    with pytest.raises(ConfigError, match=r"model.snl.cnn_teacher.sha256 is required"):
        tiny_method_settings("snl_rd", "model.snl.cnn_teacher.weights=s3://bucket/r.safetensors")
    with pytest.raises(ConfigError, match="model.teacher.sha256 must be 64 hex digits"):
        tiny_settings("model.teacher.weights=s3://bucket/t.safetensors", "model.teacher.sha256=abc")


def test_the_cnn_teacher_comes_from_s3_the_same_way(moto_s3, tmp_path):
    cfg = tiny_method_settings("snl_rd").model.snl.cnn_teacher
    net = timm.create_model(cfg.name, pretrained=False, **cfg.timm_kwargs)
    path = tmp_path / "tiny_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    digest = checked_checkpoint(path)
    uri = publish_to_s3(path, f"s3://{moto_s3.bucket}/cnn-{uuid.uuid4().hex[:8]}", moto_s3, digest)
    key = "model.snl.cnn_teacher"
    settings = tiny_method_settings("snl_rd", f"{key}.weights={uri}", f"{key}.sha256={digest}",
                                    f"{key}.cache_dir={tmp_path / 'cache'}", endpoint(moto_s3))
    model = build_model_with_teacher_weights(settings)
    assert (model.teacher.identity.weights, model.teacher.identity.sha256) == (uri, digest)
    assert torch.equal(model.teacher.net.conv1.weight, net.conv1.weight)


def test_publishing_never_overwrites_other_bytes(published, moto_s3, tmp_path):
    uri, digest, _ = published
    prefix = uri.rsplit("/", 1)[0]
    same = tmp_path / "again" / "tiny_dinov2.safetensors"
    same.parent.mkdir()
    tiny_teacher_file(same)  # the same weights, byte for byte
    assert publish_to_s3(same, prefix, moto_s3, checked_checkpoint(same)) == uri
    other = tmp_path / "other" / "tiny_dinov2.safetensors"
    other.parent.mkdir()
    tiny_teacher_file(other, seed=1)
    with pytest.raises(PublishError, match=rf"{uri} already exists with other bytes \(sha256 {digest}"):
        publish_to_s3(other, prefix, moto_s3, checked_checkpoint(other))
    bucket, key = split_s3_uri(uri)
    stored = s3_client(moto_s3).get_object(Bucket=bucket, Key=key)["Body"].read()
    assert stored == same.read_bytes()


def test_publishers_racing_to_one_key_leave_one_object_and_the_loser_is_refused(moto_s3, tmp_path):
    """Four publishers start together on one fresh key: two with weights A, two with B. The
    conditional put lets exactly one object land; the publishers of its bytes succeed (nothing
    written for all but one), the others are refused naming the key, and the stored bytes are the
    winner's. Without `If-None-Match` all four succeed and the last writer's bytes stay."""
    files = {}
    for seed in (0, 1):
        (tmp_path / f"s{seed}").mkdir()
        files[seed] = tiny_teacher_file(tmp_path / f"s{seed}" / "race.safetensors", seed=seed)[0]
    digests = {seed: checked_checkpoint(path) for seed, path in files.items()}
    prefix = f"s3://{moto_s3.bucket}/race-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(4)

    def publish(seed: int):
        barrier.wait()
        try:
            return seed, publish_to_s3(files[seed], prefix, moto_s3, digests[seed])
        except PublishError as exc:
            return seed, exc

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(publish, (0, 1, 0, 1)))
    uri = f"{prefix}/race.safetensors"
    bucket, key = split_s3_uri(uri)
    stored = s3_client(moto_s3).get_object(Bucket=bucket, Key=key)["Body"].read()
    winner = next(seed for seed, path in files.items() if path.read_bytes() == stored)
    assert [out for seed, out in outcomes if seed == winner] == [uri, uri]
    for seed, out in outcomes:
        if seed != winner:
            assert isinstance(out, PublishError) and f"{uri} already exists with other bytes" in str(out)


def test_publish_refuses_a_file_that_is_not_plain_weights(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "code": print}, evil)  # a pickled global: not plain weights
    with pytest.raises(PublishError, match="evil.pth"):
        checked_checkpoint(evil)
    sidecar_mismatch, _ = tiny_teacher_file(tmp_path / "t.safetensors")
    (tmp_path / "t.safetensors.sha256").write_text("0" * 64 + "  t.safetensors\n")
    with pytest.raises(PublishError, match="its sha256 is .* but t.safetensors.sha256 records 0000"):
        checked_checkpoint(sidecar_mismatch)


def test_cli_publish_to_s3_prints_lines_that_configure_the_teacher(moto_s3, tmp_path):
    path, _ = tiny_teacher_file(tmp_path / "cli_teacher.safetensors")
    prefix = f"s3://{moto_s3.bucket}/cli-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run([sys.executable, "-m", "plantad.cli", "teacher", "publish", str(path), "--to", prefix,
                           "--config", str(PARAMS), "--set", endpoint(moto_s3)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pasted = yaml.safe_load(proc.stdout.split("paste into params.yaml:", 1)[1])
    assert pasted == {"model": {"teacher": {"weights": f"{prefix}/cli_teacher.safetensors",
                                            "sha256": file_sha256(path)}}}
    settings = tiny_settings(*(f"model.teacher.{k}={v}" for k, v in pasted["model"]["teacher"].items()),
                             f"model.teacher.cache_dir={tmp_path / 'cache'}", endpoint(moto_s3))
    assert build_model_with_teacher_weights(settings).teacher.identity.sha256 == file_sha256(path)


def test_a_teacher_published_to_mlflow_is_fetched_by_models_uri(mlflow_server, tmp_path):
    path, net = tiny_teacher_file(tmp_path / "registry_teacher.safetensors")
    digest = checked_checkpoint(path)
    from plantad.config import MlflowConfig

    name = f"teacher-{uuid.uuid4().hex[:8]}"
    uri = publish_to_mlflow(path, mlflow_server, MlflowConfig(experiment="teachers-test"), name, digest)
    assert uri == f"models:/{name}/1"
    settings = remote(uri, digest, tmp_path / "cache", f"mlflow.tracking_uri={mlflow_server}")
    model = build_model_with_teacher_weights(settings)
    assert (model.teacher.identity.weights, model.teacher.identity.sha256) == (uri, digest)
    assert torch.equal(model.teacher.vit.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight)


def test_concurrent_fetches_on_one_node_download_once(published, moto_s3, tmp_path, caplog):
    """Two workers of one node start together: the lock makes one download and the other reuse it."""
    import threading

    from plantad.tracking.teacher_weights import fetch_teacher_file

    uri, digest, _ = published
    paths = []
    with caplog.at_level(logging.INFO, logger="plantad.tracking.teacher_weights"):
        threads = [threading.Thread(target=lambda: paths.append(
            fetch_teacher_file(uri, digest, tmp_path / "cache", moto_s3, None))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert len(paths) == 2 and paths[0] == paths[1] and file_sha256(paths[0]) == digest
    assert caplog.text.count("downloaded and verified") == 1 and caplog.text.count("using the cached copy") == 1
