"""Image-level datasets (no masks) in both layouts go through scan, validate, train and evaluate:
image metrics as usual, pixel metrics null everywhere they cannot exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from plantad.config import SemanticDemoConfig
from plantad.data.demo import generate_semantic_demo
from plantad.data.manifest import scan_dataset
from plantad.evaluation.evaluate import evaluate_model
from plantad.evaluation.metrics import image_auroc, metrics_to_json
from plantad.evaluation.report import metrics_table, write_plots
from plantad.models.checkpoint import load_model
from plantad.tracking.experiment import metric_entries
from plantad.training.trainer import train_model
from plantad.validation import validate_manifest
from tiny import tiny_settings

PIXEL = ("pixel_auroc", "pixel_aupro")


def mvtec_without_ground_truth(demo_root: Path, dest: Path) -> Path:
    shutil.copytree(demo_root, dest)
    for gt in list(dest.glob("*/ground_truth")):
        shutil.rmtree(gt)
    return dest


def plain_semantic(dest: Path) -> Path:
    cfg = SemanticDemoConfig(image_size=64, n_train=12, n_test_good=4, n_test_anomalous=2)
    return generate_semantic_demo(dest, cfg, seed=0)


@pytest.fixture(scope="module", params=["mvtec-without-ground-truth", "plain-semantic"])
def image_level(request, demo_root, tmp_path_factory):
    """(root, manifest, settings, metrics, predictions, tmp) of a tiny dual model on a mask-less dataset."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "plain-semantic":
        root = plain_semantic(tmp / "data")
    else:
        root = mvtec_without_ground_truth(demo_root, tmp / "data")
    manifest = scan_dataset(root)
    settings = tiny_settings("train.steps=20")
    result = train_model(settings, manifest, root, tmp / "model", progress=False)
    model, _ = load_model(result.model_path)
    metrics, pred = evaluate_model(model, manifest, root, settings, progress=False)
    return root, manifest, settings, metrics, pred, tmp


def test_scan_finds_no_masks_and_validation_passes(image_level) -> None:
    _, manifest, settings, _, _, tmp = image_level
    assert manifest["mask_path"].isna().all() and (manifest["label"] == 1).sum() > 0
    report = validate_manifest(manifest, settings.validation, tmp / "validation")
    assert report.success, report.summary()


def test_image_metrics_are_computed_and_pixel_metrics_null(image_level) -> None:
    _, manifest, _, metrics, pred, _ = image_level
    assert pred.pixel_categories == set()
    for category, values in metrics["per_category"].items():
        sel = pred.rows["category"].to_numpy() == category
        assert values["image_auroc"] == pytest.approx(image_auroc(pred.labels[sel], pred.probability[sel]))
        assert values["pixel_auroc"] is None and values["pixel_aupro"] is None
    expected = np.mean([v["image_auroc"] for v in metrics["per_category"].values()])
    assert metrics["image_auroc"] == pytest.approx(expected)
    assert metrics["pixel_auroc"] is None and metrics["pixel_aupro"] is None
    assert metrics["n_anomalous"] == int(((manifest["split"] == "test") & (manifest["label"] == 1)).sum())
    loaded = json.loads(metrics_to_json(metrics))
    assert loaded["pixel_auroc"] is None and isinstance(loaded["image_auroc"], float)


def test_table_plots_and_mlflow_metrics_say_missing(image_level) -> None:
    root, _, _, metrics, pred, tmp = image_level
    table = metrics_table(metrics).splitlines()
    mean = table[-1].split()
    assert mean[0] == "mean" and mean[4:] == ["n/a", "n/a"] and mean[1] != "n/a"
    names = {m.key for m in metric_entries(metrics, 0)}
    assert "image_auroc" in names and not any(k.endswith(PIXEL) for k in names), names
    written = write_plots(pred, metrics, tmp / "plots", root=root)
    assert {p.name for p in written} >= {"per_category.png", "overlays.png", "roc.csv"}


def test_semantic_only_model_reports_no_pixel_metrics(demo_root, demo_manifest, tmp_path) -> None:
    """Even on data with masks: its 'map' would be the image score copied to every pixel."""
    settings = tiny_settings("train.steps=10", "model.branches=semantic")
    result = train_model(settings, demo_manifest, demo_root, tmp_path / "model", progress=False)
    model, _ = load_model(result.model_path)
    metrics, pred = evaluate_model(model, demo_manifest, demo_root, settings, progress=False)
    assert pred.maps is None and pred.pixel_categories == set()
    assert metrics["pixel_auroc"] is None and metrics["pixel_aupro"] is None
    assert all(v["pixel_auroc"] is None for v in metrics["per_category"].values())
    assert metrics["image_auroc"] is not None and 0.0 <= metrics["image_auroc"] <= 1.0
    assert not any(m.key.endswith(PIXEL) for m in metric_entries(metrics, 0))
    written = {p.name for p in write_plots(pred, metrics, tmp_path / "plots", root=demo_root)}
    assert "overlays.png" not in written and "per_category.png" in written


def test_masks_are_optional_per_category_but_never_partial(demo_root, tmp_path) -> None:
    root = shutil.copytree(demo_root, tmp_path / "data")
    shutil.rmtree(root / "weave" / "ground_truth")  # weave: image-level only; metal, nut keep masks
    settings = tiny_settings()
    good = validate_manifest(scan_dataset(root), settings.validation, tmp_path / "v1")
    assert good.success, good.summary()
    dropped = sorted((root / "nut" / "ground_truth" / "scratch").glob("*_mask.png"))[0]
    dropped.unlink()
    bad = validate_manifest(scan_dataset(root), settings.validation, tmp_path / "v2")
    (failure,) = bad.failures
    assert failure.expectation == "anomalous test images have masks"
    assert [ex["path"] for ex in failure.examples] == [f"nut/test/scratch/{dropped.name.replace('_mask', '')}"]


def test_partly_masked_dataset_gives_pixel_metrics_where_masks_exist(trained_tiny, demo_root, tmp_path) -> None:
    settings, result = trained_tiny
    root = shutil.copytree(demo_root, tmp_path / "data")
    shutil.rmtree(root / "weave" / "ground_truth")
    model, _ = load_model(result.model_path)
    metrics, pred = evaluate_model(model, scan_dataset(root), root, settings, progress=False)
    assert pred.pixel_categories == {"metal", "nut"}
    assert metrics["per_category"]["weave"]["pixel_auroc"] is None
    per = metrics["per_category"]
    assert metrics["pixel_auroc"] == pytest.approx((per["metal"]["pixel_auroc"] + per["nut"]["pixel_auroc"]) / 2)
