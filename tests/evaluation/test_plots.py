"""Plots: valid PNGs of the documented sizes, what they draw, DVC curve CSVs, no global state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from plantad.evaluation.metrics import compute_metrics, pr_curve_points, roc_curve_points
from plantad.evaluation.plots import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    plot_overlay_grid,
    plot_per_category,
    plot_pr,
    plot_roc,
    write_curve_csv,
)


@pytest.fixture(scope="module")
def scored() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    cats = np.array(["bolt", "cable", "wood", "zip"] * 10)
    labels[cats == "zip"] = 0  # one category without anomalies: no curve, NaN metrics
    return {"labels": labels, "scores": rng.random(40) + 0.5 * labels, "categories": cats}


def png(path: Path) -> np.ndarray:
    """Decoded RGB pixels; fails unless the file is a complete, valid PNG."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("plot", [plot_roc, plot_pr])
def test_curve_plots(plot, scored, tmp_path: Path) -> None:
    overall = plot(scored["labels"], scored["scores"], tmp_path / "sub" / "all.png", "curve")
    per_cat = plot(scored["labels"], scored["scores"], tmp_path / "cats.png", "curve", categories=scored["categories"])
    assert overall == tmp_path / "sub" / "all.png" and per_cat == tmp_path / "cats.png"
    a, b = png(overall), png(per_cat)
    assert a.shape == b.shape == (500, 600, 3)
    assert np.abs(a.astype(int) - b.astype(int)).sum() > 1000  # the category curves are drawn


@pytest.mark.parametrize("plot", [plot_roc, plot_pr])
def test_curve_plots_invalid_inputs(plot, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both normal"):
        plot([0, 0, 0], [0.1, 0.2, 0.3], tmp_path / "x.png", "one class")
    with pytest.raises(ValueError, match=r"labels shape \(3,\) and scores shape \(2,\)"):
        plot([0, 1, 1], [0.1, 0.2], tmp_path / "x.png", "short", categories=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"categories shape \(2,\)"):
        plot([0, 1, 1], [0.1, 0.2, 0.3], tmp_path / "x.png", "short", categories=["a", "b"])


def test_per_category_bars(scored, tmp_path: Path) -> None:
    metrics = compute_metrics(scored["labels"], scored["scores"], scored["categories"])
    pixels = png(plot_per_category(metrics, tmp_path / "bars.png"))
    assert pixels.shape == (450, int(100 * (2 + 1.25 * 5)), 3)  # 4 categories + the mean
    two = {**metrics, "per_category": {k: metrics["per_category"][k] for k in ("bolt", "cable")}}
    assert png(plot_per_category(two, tmp_path / "two.png")).shape == (450, int(100 * (2 + 1.25 * 3)), 3)


@pytest.fixture(scope="module")
def overlay_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (20, 32, 32, 3)).astype(np.uint8)
    masks = np.zeros((20, 16, 16), dtype=np.uint8)
    masks[::2, 4:10, 5:12] = 1
    maps = (rng.random(masks.shape) + masks).astype(np.float32)
    return {"images": images, "maps": maps, "masks": masks, "titles": [f"img {i}" for i in range(20)]}


def test_overlay_grid_sizes_and_max_images(overlay_inputs, tmp_path: Path) -> None:
    d = overlay_inputs
    three = png(plot_overlay_grid(d["images"][:3], d["maps"][:3], d["masks"][:3], d["titles"][:3], tmp_path / "3.png"))
    assert three.shape == (250, 3 * 400, 3)  # 3 images a row, 2 panels of 200 px each
    many = png(plot_overlay_grid(d["images"], d["maps"], d["masks"], d["titles"], tmp_path / "20.png"))
    assert many.shape == (4 * 250, 4 * 400, 3)  # capped at 16: 4 rows of 4
    six = png(plot_overlay_grid(d["images"], d["maps"], d["masks"], d["titles"], tmp_path / "6.png", max_images=6))
    assert six.shape == (2 * 250, 4 * 400, 3)


def test_overlay_grid_draws_ground_truth_contours(overlay_inputs, tmp_path: Path) -> None:
    d = {k: v[:4] for k, v in overlay_inputs.items()}
    with_gt = png(plot_overlay_grid(d["images"], d["maps"], d["masks"], d["titles"], tmp_path / "gt.png"))
    no_gt = png(plot_overlay_grid(d["images"], d["maps"], None, d["titles"], tmp_path / "none.png"))
    lime = np.all(with_gt == [0, 255, 0], axis=-1).sum() - np.all(no_gt == [0, 255, 0], axis=-1).sum()
    assert lime > 50


def test_overlay_grid_accepts_normalised_tensors(overlay_inputs, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    d = {k: v[:2] for k, v in overlay_inputs.items()}
    x = torch.from_numpy(d["images"]).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    from_uint8 = png(plot_overlay_grid(d["images"], d["maps"], d["masks"], d["titles"], tmp_path / "u8.png"))
    from_tensor = png(plot_overlay_grid(x, d["maps"], d["masks"], d["titles"], tmp_path / "t.png"))
    assert np.abs(from_uint8.astype(int) - from_tensor.astype(int)).max() <= 2  # same picture


def test_overlay_grid_rejects_mismatched_inputs(overlay_inputs, tmp_path: Path) -> None:
    d = overlay_inputs
    with pytest.raises(ValueError, match="titles"):
        plot_overlay_grid(d["images"][:3], d["maps"][:3], d["masks"][:3], d["titles"][:2], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"masks \(3, 16, 16\)"):
        plot_overlay_grid(d["images"][:2], d["maps"][:2], d["masks"][:3], d["titles"][:2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="uint8 \\(N, H, W, 3\\)"):
        plot_overlay_grid(d["images"][:2, 0], d["maps"][:2], None, d["titles"][:2], tmp_path / "x.png")


@pytest.mark.parametrize("kind", ["roc", "pr"])
def test_curve_csv_for_dvc_plots(kind: str, scored, tmp_path: Path) -> None:
    path = write_curve_csv(scored["labels"], scored["scores"], tmp_path / f"{kind}.csv", kind=kind)
    table = pd.read_csv(path)
    if kind == "roc":
        expected = roc_curve_points(scored["labels"], scored["scores"])
        assert list(table.columns) == ["fpr", "tpr", "threshold"]
    else:
        expected = pr_curve_points(scored["labels"], scored["scores"])
        expected = (*expected[:2], np.r_[expected[2], np.inf])
        assert list(table.columns) == ["precision", "recall", "threshold"]
    for column, values in zip(table.columns, expected):
        np.testing.assert_allclose(table[column].to_numpy(), values, rtol=1e-15)


def test_curve_csv_rejects_unknown_kind(scored, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'det'"):
        write_curve_csv(scored["labels"], scored["scores"], tmp_path / "x.csv", kind="det")


def test_no_global_matplotlib_state() -> None:
    """Importing plots loads no matplotlib; plotting leaves pyplot's backend and figure list alone."""
    code = (
        "import sys, numpy as np\n"
        "import plantad.evaluation.plots as p\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at import time'\n"
        "import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt\n"
        "p.plot_roc([0, 1, 0, 1], [0.1, 0.9, 0.3, 0.2], sys.argv[1], 't')\n"
        "assert matplotlib.get_backend() == 'svg' and plt.get_fignums() == [], (matplotlib.get_backend(), plt.get_fignums())\n"
    )
    result = subprocess.run([sys.executable, "-c", code, "/dev/null"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
