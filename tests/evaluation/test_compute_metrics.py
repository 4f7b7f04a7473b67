"""compute_metrics: per-category values, means that ignore NaN, plain floats, strict JSON."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from plantad.evaluation.metrics import (
    METRIC_KEYS,
    compute_metrics,
    image_ap,
    image_auroc,
    image_f1_max,
    metrics_to_json,
    pixel_aupro,
    pixel_auroc,
)


@pytest.fixture(scope="module")
def dataset() -> dict[str, np.ndarray]:
    """Categories 'bolt' and 'cable' with both classes, 'wood' with normal images only; 16x16 maps."""
    rng = np.random.default_rng(7)
    cats = np.array(["cable"] * 10 + ["bolt"] * 12 + ["wood"] * 6)
    labels = np.r_[rng.permutation([0] * 6 + [1] * 4), rng.permutation([0] * 5 + [1] * 7), np.zeros(6, int)]
    scores = rng.random(labels.size) + 0.6 * labels
    masks = np.zeros((labels.size, 16, 16), dtype=np.uint8)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, 10, 2)
        masks[i, r : r + rng.integers(2, 6), c : c + rng.integers(2, 6)] = 1
    maps = (rng.random(masks.shape) + 0.8 * masks * rng.random(masks.shape)).astype(np.float32)
    return {"labels": labels, "scores": scores, "categories": cats, "masks": masks, "maps": maps}


def reference(d: dict[str, np.ndarray], cat: str, fpr_limit: float) -> dict[str, float]:
    i = d["categories"] == cat
    y, s, m, a = d["labels"][i], d["scores"][i], d["masks"][i], d["maps"][i]
    return {
        "image_auroc": image_auroc(y, s),
        "image_ap": image_ap(y, s),
        "image_f1_max": image_f1_max(y, s),
        "pixel_auroc": pixel_auroc(m, a),
        "pixel_aupro": pixel_aupro(m, a, fpr_limit),
    }


def test_per_category_values_and_means(dataset, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="plantad.evaluation.metrics"):
        out = compute_metrics(**dataset, fpr_limit=0.2)
    assert set(out) == {*METRIC_KEYS, "per_category", "n_images", "n_anomalous"}
    assert list(out["per_category"]) == ["bolt", "cable", "wood"]
    for cat in ("bolt", "cable"):
        assert out["per_category"][cat] == pytest.approx(reference(dataset, cat, 0.2), abs=1e-12)
    wood = out["per_category"]["wood"]
    assert set(wood) == set(METRIC_KEYS) and all(math.isnan(v) for v in wood.values())
    assert "'wood'" in caplog.text and "image_auroc" in caplog.text and "pixel_aupro" in caplog.text
    for key in METRIC_KEYS:  # mean over the two defined categories, not pooled over images
        assert out[key] == pytest.approx((out["per_category"]["bolt"][key] + out["per_category"]["cable"][key]) / 2)
    pooled = image_auroc(dataset["labels"], dataset["scores"])
    assert out["image_auroc"] != pytest.approx(pooled)
    assert (out["n_images"], out["n_anomalous"]) == (28, 11)


def test_values_are_plain_python_numbers(dataset) -> None:
    out = compute_metrics(**dataset)
    values = [out[k] for k in METRIC_KEYS] + [v for c in out["per_category"].values() for v in c.values()]
    assert all(type(v) is float for v in values)
    assert type(out["n_images"]) is int and type(out["n_anomalous"]) is int


def test_pixel_metrics_null_without_masks(dataset) -> None:
    out = compute_metrics(dataset["labels"], dataset["scores"], dataset["categories"])
    assert out["pixel_auroc"] is None and out["pixel_aupro"] is None
    assert all(c["pixel_auroc"] is None and c["pixel_aupro"] is None for c in out["per_category"].values())
    assert out["image_auroc"] == pytest.approx(compute_metrics(**dataset)["image_auroc"])
    loaded = json.loads(metrics_to_json(out))
    assert loaded["pixel_aupro"] is None and loaded["per_category"]["bolt"]["pixel_auroc"] is None


def test_pixel_metrics_only_for_categories_with_masks(dataset) -> None:
    out = compute_metrics(**dataset, pixel_categories={"bolt"})
    full = compute_metrics(**dataset)
    assert out["per_category"]["bolt"]["pixel_auroc"] == pytest.approx(full["per_category"]["bolt"]["pixel_auroc"])
    assert out["per_category"]["cable"]["pixel_auroc"] is None and out["per_category"]["cable"]["pixel_aupro"] is None
    # the mean covers the categories that have the metric: here bolt alone
    assert out["pixel_aupro"] == pytest.approx(full["per_category"]["bolt"]["pixel_aupro"])
    assert out["image_auroc"] == pytest.approx(full["image_auroc"])
    none = compute_metrics(**dataset, pixel_categories=set())
    assert none["pixel_auroc"] is None and none["pixel_aupro"] is None


def test_category_keys_are_strings() -> None:
    out = compute_metrics([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.3], [3, 3, None, None])
    assert out["per_category"]["3"]["image_auroc"] == 1.0 and out["per_category"]["None"]["image_auroc"] == 1.0


def test_all_categories_degenerate_gives_nan_means() -> None:
    out = compute_metrics([0, 0, 1], [0.1, 0.2, 0.3], ["a", "a", "b"])
    assert all(math.isnan(out[k]) for k in METRIC_KEYS if k.startswith("image"))
    assert out["pixel_auroc"] is None and out["pixel_aupro"] is None  # no masks: absent, not undefined


def test_metrics_to_json_writes_nan_as_null(dataset) -> None:
    out = compute_metrics(dataset["labels"], dataset["scores"], dataset["categories"])
    out["extra"] = {"numpy": np.float32(0.5), "count": np.int64(3), "inf": float("inf"), "arr": np.array([1.0, np.nan])}

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    loaded = json.loads(metrics_to_json(out), parse_constant=refuse)
    assert loaded["pixel_auroc"] is None and loaded["per_category"]["wood"]["image_ap"] is None
    assert loaded["image_auroc"] == out["image_auroc"] and loaded["n_images"] == 28
    assert loaded["extra"] == {"numpy": 0.5, "count": 3, "inf": None, "arr": [1.0, None]}


def test_shape_errors_name_both_shapes(dataset) -> None:
    d = dataset
    with pytest.raises(ValueError, match=r"labels shape \(28,\) and scores shape \(27,\)"):
        compute_metrics(d["labels"], d["scores"][:-1], d["categories"])
    with pytest.raises(ValueError, match=r"categories shape \(27,\) and labels shape \(28,\)"):
        compute_metrics(d["labels"], d["scores"], d["categories"][:-1])
    with pytest.raises(ValueError, match=r"masks shape \(28, 16, 16\) and maps shape \(28, 16, 15\)"):
        compute_metrics(d["labels"], d["scores"], d["categories"], d["masks"], d["maps"][..., :-1])
    with pytest.raises(ValueError, match=r"masks shape \(27, 16, 16\) and labels shape \(28,\)"):
        compute_metrics(d["labels"], d["scores"], d["categories"], d["masks"][:-1], d["maps"][:-1])
    with pytest.raises(ValueError, match="both masks and maps"):
        compute_metrics(d["labels"], d["scores"], d["categories"], masks=d["masks"])
