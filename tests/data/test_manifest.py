"""scan_dataset on real folders (the demo and hand-made ones), and the Parquet round trip."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from data_helpers import SMALL, random_pixels, sha256_of, write_image

from plantad.data.layout import DatasetLayoutError
from plantad.data.manifest import (
    MANIFEST_COLUMNS,
    CorruptImageError,
    ManifestError,
    read_manifest,
    scan_dataset,
    write_manifest,
)

N_DEFECTS = {"weave": 3, "metal": 3, "nut": 4}


def test_scan_demo_rows_columns_and_dtypes(demo_root: Path) -> None:
    df = scan_dataset(demo_root)
    assert list(df.columns) == MANIFEST_COLUMNS
    per_category = SMALL.n_train + SMALL.n_test_good
    assert len(df) == sum(per_category + SMALL.n_test_defect * n for n in N_DEFECTS.values())
    assert list(df["category"].unique()) == ["metal", "nut", "weave"]
    for col in ("width", "height", "channels", "mask_width", "mask_height"):
        assert df[col].dtype == "Int64", col
    assert df["label"].dtype == np.int64
    assert df["mean_intensity"].dtype == np.float64
    assert pd.api.types.is_string_dtype(df["path"]) and pd.api.types.is_string_dtype(df["mask_path"])
    assert (df["width"] == SMALL.image_size).all() and (df["channels"] == 3).all()
    assert df["decode_error"].isna().all()
    assert df["mean_intensity"].between(0, 1).all() and (df["std_intensity"] > 0).all()


def test_scan_demo_labels_masks_and_hashes(demo_root: Path) -> None:
    df = scan_dataset(demo_root)
    assert ((df["label"] == 1) == (df["defect_type"] != "good")).all()
    assert (df.loc[df["split"] == "train", "label"] == 0).all()
    anomalous = df[df["label"] == 1]
    assert anomalous["mask_path"].notna().all() and df.loc[df["label"] == 0, "mask_path"].isna().all()
    assert (anomalous["mask_width"] == anomalous["width"]).all()
    row = anomalous.iloc[0]
    assert row["mask_path"] == f"{row['category']}/ground_truth/{row['defect_type']}/000_mask.png"
    for _, r in df.sample(5, random_state=0).iterrows():
        assert "\\" not in r["path"] and not Path(r["path"]).is_absolute()
        assert r["sha256"] == sha256_of(demo_root / r["path"])
    assert df["sha256"].is_unique


def test_scan_order_is_category_then_train_then_test(demo_root: Path) -> None:
    df = scan_dataset(demo_root)
    for _, rows in df.groupby("category", sort=False):
        assert rows["split"].tolist() == sorted(rows["split"], key=["train", "test"].index)
    keys = list(zip(df["category"], df["split"] == "test", df["path"]))
    assert keys == sorted(keys)


def test_single_class_scan_and_unknown_category(demo_root: Path) -> None:
    one = scan_dataset(demo_root, categories=["nut"])
    full = scan_dataset(demo_root)
    pd.testing.assert_frame_equal(one, full[full["category"] == "nut"].reset_index(drop=True))
    with pytest.raises(DatasetLayoutError, match=r"\['screw'\].*found there: \['metal', 'nut', 'weave'\]"):
        scan_dataset(demo_root, categories=["nut", "screw"])


def test_scan_rejects_missing_and_empty_roots(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        scan_dataset(tmp_path / "absent")
    with pytest.raises(DatasetLayoutError, match="no category folders"):
        scan_dataset(tmp_path)
    (tmp_path / "bolt" / "train" / "good").mkdir(parents=True)
    (tmp_path / "bolt" / "train" / "good" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetLayoutError, match="no images"):
        scan_dataset(tmp_path)


def _tiny_dataset(root: Path) -> None:
    """L, RGBA and JPEG images, an anomaly without a mask, a stray text file."""
    write_image(root / "bolt/train/good/a.png", random_pixels(1, (40, 48)))  # L
    write_image(root / "bolt/train/good/b.PNG", random_pixels(2, (40, 48, 4)))  # RGBA
    write_image(root / "bolt/test/good/c.jpg", random_pixels(3, (40, 48, 3)))
    write_image(root / "bolt/test/crack/d.png", random_pixels(4, (40, 48, 3)))  # no mask
    write_image(root / "bolt/test/crack/e.bmp", random_pixels(5, (40, 48, 3)))
    write_image(root / "bolt/ground_truth/crack/e_mask.png", np.zeros((40, 48), np.uint8))
    (root / "bolt/train/good/readme.txt").write_text("not an image, not listed")


def test_scan_measures_modes_and_tolerates_missing_masks(tmp_path: Path) -> None:
    _tiny_dataset(tmp_path)
    df = scan_dataset(tmp_path).set_index("path")
    assert list(df.index) == ["bolt/train/good/a.png", "bolt/train/good/b.PNG", "bolt/test/crack/d.png",
                              "bolt/test/crack/e.bmp", "bolt/test/good/c.jpg"]  # fmt: skip
    assert df.loc["bolt/train/good/a.png", "channels"] == 1
    assert df.loc["bolt/train/good/b.PNG", "channels"] == 4
    assert (df.loc["bolt/train/good/a.png", ["width", "height"]] == [48, 40]).all()
    assert pd.isna(df.loc["bolt/test/crack/d.png", "mask_path"])  # validation flags it, not the scan
    assert df.loc["bolt/test/crack/e.bmp", "mask_path"] == "bolt/ground_truth/crack/e_mask.png"
    grey = random_pixels(1, (40, 48)) / 255.0
    assert df.loc["bolt/train/good/a.png", "mean_intensity"] == pytest.approx(grey.mean())
    assert df.loc["bolt/train/good/a.png", "std_intensity"] == pytest.approx(grey.std())


def _corrupt_two(root: Path) -> tuple[Path, Path]:
    _tiny_dataset(root)
    good = write_image(root / "bolt/train/good/f.png", random_pixels(6, (64, 64, 3)))
    truncated = root / "bolt/train/good/g.png"
    truncated.write_bytes(good.read_bytes()[:300])
    text = root / "bolt/test/good/h.png"
    text.write_text("I am text, not a PNG")
    return truncated, text


def test_raise_mode_lists_every_bad_file_in_one_error(tmp_path: Path) -> None:
    truncated, text = _corrupt_two(tmp_path)
    with pytest.raises(CorruptImageError) as info:
        scan_dataset(tmp_path, on_error="raise")
    assert sorted(info.value.paths) == sorted([truncated, text])
    assert str(truncated) in str(info.value) and str(text) in str(info.value)
    assert pickle.loads(pickle.dumps(info.value)).paths == info.value.paths


def test_record_mode_keeps_bad_rows_with_decode_error(tmp_path: Path) -> None:
    truncated, text = _corrupt_two(tmp_path)
    df = scan_dataset(tmp_path, on_error="record").set_index("path")
    assert len(df) == 8
    bad = df.loc[["bolt/train/good/g.png", "bolt/test/good/h.png"]]
    assert bad["decode_error"].notna().all()
    assert bad[["width", "height", "channels"]].isna().all().all()
    assert bad["sha256"].tolist() == [sha256_of(truncated), sha256_of(text)]
    assert df.drop(bad.index)["decode_error"].isna().all()
    with pytest.raises(ValueError, match="on_error"):
        scan_dataset(tmp_path, on_error="skip")  # type: ignore[arg-type]


def test_corrupt_mask_is_reported_not_hidden(tmp_path: Path) -> None:
    _tiny_dataset(tmp_path)
    mask = tmp_path / "bolt/ground_truth/crack/e_mask.png"
    mask.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(CorruptImageError) as info:
        scan_dataset(tmp_path)
    assert info.value.paths == [mask]
    row = scan_dataset(tmp_path, on_error="record").set_index("path").loc["bolt/test/crack/e.bmp"]
    assert row["mask_path"] == "bolt/ground_truth/crack/e_mask.png" and pd.isna(row["mask_width"])
    assert pd.isna(row["decode_error"])  # the image itself decodes


def test_write_read_round_trip(demo_root: Path, tmp_path: Path) -> None:
    df = scan_dataset(demo_root)
    out = tmp_path / "nested" / "dir" / "manifest.parquet"
    write_manifest(df, out)
    back = read_manifest(out)
    pd.testing.assert_frame_equal(back, df)
    assert [p.name for p in out.parent.iterdir()] == ["manifest.parquet"]  # no temp file left


def test_failed_write_leaves_no_file(demo_root: Path, tmp_path: Path) -> None:
    df = scan_dataset(demo_root)
    df["extra"] = [object()] * len(df)  # Parquet cannot store arbitrary objects
    out = tmp_path / "manifest.parquet"
    with pytest.raises(pa.ArrowException):
        write_manifest(df, out)
    assert list(tmp_path.iterdir()) == []
    write_manifest(df.drop(columns="extra"), out)
    with pytest.raises(pa.ArrowException):
        write_manifest(df, out)  # a failed rewrite keeps the previous manifest intact
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.parquet"]
    assert len(read_manifest(out)) == len(df)
    with pytest.raises(ManifestError, match="lacks manifest column.*sha256"):
        write_manifest(df.drop(columns=["sha256", "extra"]), out)


def test_read_errors_name_the_file(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="absent.parquet not found"):
        read_manifest(tmp_path / "absent.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_text("path,category\n")
    with pytest.raises(ManifestError, match="junk.parquet is not a readable Parquet"):
        read_manifest(junk)
    partial = tmp_path / "partial.parquet"
    scan_dataset(demo_root)[["path", "category"]].to_parquet(partial)
    with pytest.raises(ManifestError, match=r"partial.parquet lacks manifest column\(s\) \['split'"):
        read_manifest(partial)
