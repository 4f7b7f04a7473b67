"""split_holdout and ManifestDataset over a scanned demo dataset and hand-broken files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from data_helpers import SMALL
from PIL import Image
from torch.utils.data import DataLoader

from plantad.data.dataset import ManifestDataset, split_holdout
from plantad.data.images import ImageDecodeError, ImageTransform, load_rgb
from plantad.data.manifest import scan_dataset


def _fake_manifest(sizes: dict[str, int]) -> pd.DataFrame:
    """Normal train rows (sizes per category) plus one test row per category, shuffled."""
    rows = [{"path": f"{c}/train/good/{i:03d}.png", "category": c, "split": "train", "label": 0}
            for c, n in sizes.items() for i in range(n)]  # fmt: skip
    rows += [{"path": f"{c}/test/good/000.png", "category": c, "split": "test", "label": 0} for c in sizes]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)


def test_split_holdout_per_category_counts_and_disjoint() -> None:
    df = _fake_manifest({"a": 20, "b": 7, "c": 2, "d": 1})
    train, holdout = split_holdout(df, 0.25, seed=0)
    assert holdout.groupby("category").size().to_dict() == {"a": 5, "b": 2, "c": 1}
    assert (holdout["split"] == "train").all() and (train["split"] == "train").all()
    assert set(train.index).isdisjoint(holdout.index)
    assert set(train.index) | set(holdout.index) == set(df.index[df["split"] == "train"])
    assert list(train.index) == [i for i in df.index if i in set(train.index)]  # df's row order kept


def test_split_holdout_is_deterministic_and_seeded() -> None:
    df = _fake_manifest({"a": 30, "b": 30})
    first = split_holdout(df, 0.2, seed=1)[1]
    assert split_holdout(df, 0.2, seed=1)[1].equals(first)
    shuffled = df.sample(frac=1.0, random_state=5)
    assert set(split_holdout(shuffled, 0.2, seed=1)[1]["path"]) == set(first["path"])
    assert set(split_holdout(df, 0.2, seed=2)[1]["path"]) != set(first["path"])
    # a category's hold-out does not depend on the other categories
    alone = split_holdout(df[df["category"] == "b"], 0.2, seed=1)[1]
    assert set(alone["path"]) == set(first.loc[first["category"] == "b", "path"])


def test_split_holdout_zero_fraction_and_bad_values() -> None:
    df = _fake_manifest({"a": 5})
    train, holdout = split_holdout(df, 0.0, seed=0)
    assert holdout.empty and len(train) == 5
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="holdout fraction"):
            split_holdout(df, bad, seed=0)


def test_split_holdout_excludes_anomalous_train_rows() -> None:
    df = _fake_manifest({"a": 10})
    df.loc[df.index[0], "label"] = 1
    train, holdout = split_holdout(df, 0.5, seed=0)
    assert (pd.concat([train, holdout])["label"] == 0).all() and len(train) + len(holdout) == 9


def test_items_match_files_and_manifest(demo_root: Path) -> None:
    df = scan_dataset(demo_root)
    ds = ManifestDataset(df, demo_root, image_size=32, with_masks=True)
    assert len(ds) == len(df)
    row = int(np.flatnonzero(df["defect_type"] == "spot")[0])
    item = ds[row]
    assert item["index"] == row and item["label"].dtype == torch.int64 and item["label"].item() == 1
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    expected = ImageTransform(32)(load_rgb(demo_root / df.at[row, "path"]))
    assert torch.equal(item["image"], expected)
    with Image.open(demo_root / df.at[row, "mask_path"]) as m:
        mask = np.asarray(m.resize((32, 32), Image.Resampling.NEAREST))
    assert torch.equal(item["mask"][0], torch.from_numpy((mask > 0).astype(np.float32)))
    normal = ds[0]
    assert normal["label"].item() == 0 and normal["mask"].sum() == 0
    assert "mask" not in ManifestDataset(df, demo_root, 32)[row]


def test_loader_batches_and_index_joins_back(demo_root: Path) -> None:
    df = scan_dataset(demo_root, categories=["metal"])
    test = df[df["split"] == "test"]
    loader = DataLoader(ManifestDataset(test, demo_root, 28, with_masks=True), batch_size=4)
    batches = list(loader)
    assert batches[0]["image"].shape == (4, 3, 28, 28) and batches[0]["mask"].shape == (4, 1, 28, 28)
    index = torch.cat([b["index"] for b in batches]).tolist()
    labels = torch.cat([b["label"] for b in batches]).tolist()
    assert index == list(range(len(test))) and labels == test["label"].tolist()


def test_bad_file_raises_naming_the_path(demo_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(demo_root / "weave", root / "weave")
    df = scan_dataset(root)
    broken = root / df.at[2, "path"]
    broken.write_bytes(broken.read_bytes()[:100])
    ds = ManifestDataset(df, root, 32)
    assert ds[1]["image"].shape == (3, 32, 32)
    with pytest.raises(ImageDecodeError, match=str(broken)):
        ds[2]
    broken.unlink()
    with pytest.raises(ImageDecodeError, match="not found"):
        ds[2]


def test_missing_masks_fail_only_when_masks_are_asked_for(demo_root: Path) -> None:
    df = scan_dataset(demo_root)
    anomalous = df.index[df["label"] == 1][:2]
    df.loc[anomalous, "mask_path"] = None
    assert len(ManifestDataset(df, demo_root, 32)) == len(df)
    with pytest.raises(ValueError, match=f"2 anomalous image.*{df.at[anomalous[0], 'path']}"):
        ManifestDataset(df, demo_root, 32, with_masks=True)


def test_items_use_the_requested_size(demo_root: Path) -> None:
    df = scan_dataset(demo_root, categories=["nut"]).head(2)
    assert ManifestDataset(df, demo_root, SMALL.image_size + 8)[1]["image"].shape == (3, 56, 56)
