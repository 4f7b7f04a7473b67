"""The Predictor (what serving and bulk scoring hold) scores exactly like score_batch, and pins
a registry alias to one version before it loads anything."""

from __future__ import annotations

import io
import tempfile

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from plantad.data.images import ImageDecodeError, ImageTooLarge, ImageTransform, decode_untrusted, load_rgb
from plantad.models.checkpoint import load_model
from plantad.scoring import score_batch
from plantad.serving.predictor import Predictor
from plantad.serving.render import anomaly_box, heatmap_overlay_png, pixel_probability
from plantad.tracking.model_source import ModelSourceError, cache_entry, parse_registry_uri, resolve_model
from plantad.tracking.registry import CHAMPION, set_alias


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_predictor_scores_like_score_batch(trained_tiny, demo_root, demo_manifest):
    settings, result = trained_tiny
    rows = demo_manifest[demo_manifest["split"] == "test"].head(20)  # more than one scoring batch (16)
    images = [load_rgb(demo_root / p) for p in rows["path"]]
    predictor = Predictor.load(str(result.model_path.parent))
    got = predictor.score(images, with_maps=True)
    model, _ = load_model(result.model_path)
    x = torch.stack([ImageTransform(settings.data.image_size)(im) for im in images])
    ref = score_batch(model, x, settings.scoring)
    np.testing.assert_allclose([s.probability for s in got], ref.probability.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([s.local_score for s in got], ref.local_score.numpy(), rtol=1e-5, atol=1e-6)
    assert [s.is_anomalous for s in got] == ref.is_anomalous.tolist()
    np.testing.assert_allclose(got[3].anomaly_map, ref.anomaly_map[3].numpy(), rtol=1e-5, atol=1e-6)
    assert all(s.threshold == pytest.approx(float(model.noisy_or.threshold)) for s in got)
    forced = predictor.score(images[:2], threshold=0.0)
    assert all(s.is_anomalous and s.threshold == 0.0 for s in forced)


def test_registry_alias_is_pinned_to_a_version(tmp_path, trained_tiny, demo_root, demo_manifest, monkeypatch):
    import mlflow

    from plantad.tracking.pyfunc import log_pyfunc_model
    from plantad.tracking.registry import register_version

    _, result = trained_tiny
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("predictor", artifact_location=str(tmp_path / "artifacts"))
    png = (demo_root / demo_manifest.iloc[0]["path"]).read_bytes()
    mlflow.set_tracking_uri(uri)
    try:
        versions = []
        for _ in range(2):
            with mlflow.start_run(experiment_id=exp) as run:
                info = log_pyfunc_model(result.model_path.parent, png)
            versions.append(register_version(client, "pinned", run.info.run_id, "model", model_id=info.model_id))
    finally:
        mlflow.set_tracking_uri(None)
    set_alias(client, "pinned", CHAMPION, versions[0].version)
    ref = resolve_model("models:/pinned@champion", client)
    assert (ref.name, ref.version, ref.alias) == ("pinned", str(versions[0].version), "champion")
    set_alias(client, "pinned", CHAMPION, versions[1].version)  # moves after resolution: ref stays pinned
    predictor = Predictor.from_ref(ref, uri, cache_dir=tmp_path / "cache")
    assert predictor.info()["version"] == str(versions[0].version)
    assert (cache_entry(tmp_path / "cache", ref) / ".complete").is_file()  # kept: a cache
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    again = Predictor.from_ref(ref, uri)  # no cache: the download is removed once the weights are loaded
    assert again.threshold == predictor.threshold and list(scratch.iterdir()) == []
    assert predictor.ref.version_uri == f"models:/pinned/{versions[0].version}"
    assert resolve_model("models:/pinned@champion", client).version == str(versions[1].version)
    with pytest.raises(ModelSourceError, match="pinned has no alias 'nope'"):
        resolve_model("models:/pinned@nope", client)
    with pytest.raises(ModelSourceError, match="not a model directory"):
        resolve_model(str(tmp_path), None)


def test_parse_registry_uri():
    assert parse_registry_uri("models:/a@champion") == ("a", "champion", None)
    assert parse_registry_uri("models:/a/7") == ("a", None, "7")
    assert parse_registry_uri("outputs/model") is None


def test_decode_untrusted_limits_and_conversions():
    rgb = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    ok = decode_untrusted(_png(rgb), "a.png", max_bytes=10**6, max_pixels=10**6)
    assert (ok.width, ok.height, ok.converted, ok.format) == (30, 40, None, "PNG")
    grey16 = decode_untrusted(_png(np.full((8, 8), 65535, dtype=np.uint16)), "g.png")
    assert grey16.converted.startswith("converted from I") and np.asarray(grey16.image).max() == 255
    rgba = decode_untrusted(_png(np.zeros((8, 8, 4), np.uint8)), "a.png")
    assert rgba.converted == "converted from RGBA to RGB"
    with pytest.raises(ImageTooLarge, match="big.png: .*over the limit of 100 bytes"):
        decode_untrusted(_png(rgb), "big.png", max_bytes=100)
    with pytest.raises(ImageTooLarge, match="30x40 = 1200 pixels is over the limit of 1000"):
        decode_untrusted(_png(rgb), "p.png", max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="t.png"):
        decode_untrusted(_png(rgb)[:200], "t.png")
    with pytest.raises(ImageDecodeError, match="empty input"):
        decode_untrusted(b"", "e.png")


def test_box_and_heatmap_follow_the_map():
    amap = np.zeros((16, 16), np.float32)
    amap[4:7, 10:14] = 1.0  # one hot region, rows 4-6, columns 10-13
    amap[12, 1] = 0.3
    box = anomaly_box(amap, width=160, height=320)  # x scales by 10, y by 20
    assert (box["x0"], box["x1"], box["y0"], box["y1"]) == (100, 140, 80, 140)
    assert 100 <= box["peak_x"] < 140 and 80 <= box["peak_y"] < 140
    assert pixel_probability(np.array([0.0, np.log(2.0)]), 1.0) == pytest.approx([0.0, 0.5])
    png = heatmap_overlay_png(Image.new("RGB", (160, 320), (0, 0, 0)), amap, lambda_local=5.0)
    heat = np.asarray(Image.open(io.BytesIO(png)))
    assert heat.shape == (320, 160, 3)
    assert not np.array_equal(heat[100, 120], heat[300, 10])  # the hot region is coloured differently
