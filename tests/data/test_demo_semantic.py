"""The image-level semantic demo: plain layout, no masks, families separable by shape only."""

from __future__ import annotations

import numpy as np
import pytest

from plantad.cli import main
from plantad.config import SemanticDemoConfig, load_settings
from plantad.data.demo import generate_semantic_demo
from plantad.data.demo_semantic import FAMILIES, object_mask, render_object
from plantad.data.manifest import scan_dataset

SMALL = SemanticDemoConfig(image_size=48, categories=["gear", "star"], n_train=3, n_test_good=2, n_test_anomalous=2)


def test_layout_is_plain_and_has_no_masks(tmp_path) -> None:
    root = generate_semantic_demo(tmp_path / "sem", SMALL, seed=3)
    assert sorted(p.name for p in root.iterdir()) == ["gear", "star"]
    assert not list(root.rglob("ground_truth"))
    assert sorted(p.name for p in (root / "gear" / "test").iterdir()) == ["cross", "good", "star", "wheel"]
    df = scan_dataset(root)
    assert df["mask_path"].isna().all()
    gear = df[df["category"] == "gear"]
    assert (gear["split"] == "train").sum() == 3
    test = gear[gear["split"] == "test"]
    assert test["label"].tolist().count(0) == 2 and test["label"].tolist().count(1) == 3 * 2
    assert set(test.loc[test["label"] == 1, "defect_type"]) == {"star", "wheel", "cross"}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path) -> None:
    a = generate_semantic_demo(tmp_path / "a", SMALL, seed=1)
    b = generate_semantic_demo(tmp_path / "b", SMALL, seed=1)
    c = generate_semantic_demo(tmp_path / "c", SMALL, seed=2)
    rel = "star/test/gear/001.png"
    assert (a / rel).read_bytes() == (b / rel).read_bytes() != (c / rel).read_bytes()
    with pytest.raises(FileExistsError):
        generate_semantic_demo(a, SMALL, seed=1)


def test_families_differ_in_shape_not_in_colour_statistics() -> None:
    """Pose, colour and background vary alike for every family: mean colour overlaps across families."""
    size = 48
    means = {f: [render_object(f, np.random.default_rng([i, k]), size).mean() for i in range(12)]
             for k, f in enumerate(FAMILIES)}
    lo = max(min(v) for v in means.values())
    hi = min(max(v) for v in means.values())
    assert lo < hi, means  # every family's range of mean brightness overlaps every other's
    # the same pose draw gives different coverage for different families (shape is the signal)
    covers = {f: object_mask(f, np.random.default_rng(0), size) for f in FAMILIES}
    for f in FAMILIES:
        assert 0.04 < covers[f].mean() < 0.5, (f, covers[f].mean())
    assert not np.allclose(covers["gear"], covers["star"])


def test_config_rejects_a_category_without_outliers() -> None:
    with pytest.raises(ValueError, match="no outlier family"):
        SemanticDemoConfig(categories=["gear"], outlier_families=["gear"])


def test_cli_writes_the_semantic_demo(tmp_path, capsys) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("semantic_demo: {image_size: 40, categories: [wheel, cross], n_train: 2, "
                      "n_test_good: 1, n_test_anomalous: 1}\n")
    assert main(["demo-data", str(tmp_path / "d"), "--semantic", "--seed", "5", "--config", str(params)]) == 0
    assert "no masks" in capsys.readouterr().out
    df = scan_dataset(tmp_path / "d")
    assert sorted(df["category"].unique()) == ["cross", "wheel"] and int(df["width"].iloc[0]) == 40
    assert main(["demo-data", str(tmp_path / "e"), "--semantic", "--add-normal", "3", "--config", str(params)]) == 2
    assert load_settings(params).semantic_demo.n_test_anomalous == 1
