"""validate_manifest on a real tiny dataset: the good manifest passes, each kind of bad data fails
naming its expectation and the offending file(s)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from manifest_files import SIZE, add_image, describe, with_rows

from plantad.validation import DataValidationError, ValidationReport
from plantad.validation.derived import TRAIN_NORMAL_IN_CATEGORY

N_EXPECTATIONS = 21

Case = Callable[[pd.DataFrame, Path], tuple[pd.DataFrame, list[str]]]


def failed(report: ValidationReport) -> dict[str, list[str]]:
    """Failed expectation name -> paths quoted in its examples."""
    return {f.expectation: [ex["path"] for ex in f.examples] for f in report.failures}


def first(df: pd.DataFrame, **where: object) -> int:
    mask = pd.Series(True, index=df.index)
    for col, value in where.items():
        mask &= df[col] == value
    return int(df.index[mask][0])


def missing_mask(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    """A category with masks where one anomalous test image has none (masks are per category)."""
    i = first(df, label=1, split="test")
    masked = add_image(root, f"{df.at[i, 'category']}/test/dent/masked.png", df.at[i, "category"], "test", "dent",
                       mask_size=SIZE)
    df.loc[i, ["mask_path", "mask_width", "mask_height"]] = pd.NA
    return with_rows(df, masked), [df.at[i, "path"]]


def test_a_category_without_any_mask_is_image_level_and_valid(good_manifest, validate) -> None:
    df = good_manifest.copy()
    weave = df["category"] == "weave"
    df.loc[weave, ["mask_path", "mask_width", "mask_height"]] = pd.NA
    report = validate(df)
    assert report.success, report.summary()


def unreadable_mask(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    i = first(df, label=1, split="test")
    df.loc[i, ["mask_width", "mask_height"]] = pd.NA
    return df, [df.at[i, "path"]]


def mask_wrong_size(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    row = add_image(root, "metal/test/dent/swapped.png", "metal", "test", "dent", mask_size=SIZE[::-1])
    return with_rows(df, row), [row["path"]]


def train_file_copied_to_test(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    train_path = df.at[first(df, split="train", category="weave"), "path"]
    shutil.copyfile(root / train_path, root / "weave/test/good/copy.png")
    row = describe(root, "weave/test/good/copy.png", "weave", "test", "good")
    return with_rows(df, row), [train_path, row["path"]]


def undecodable_file(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    (root / "metal/test/good/truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    row = describe(root, "metal/test/good/truncated.png", "metal", "test", "good")
    assert row["decode_error"] and row["width"] is None
    return with_rows(df, row), [row["path"]]


def too_narrow(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    row = add_image(root, "metal/train/good/narrow.png", "metal", "train", size=(16, 40))
    return with_rows(df, row), [row["path"]]


def too_short(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    row = add_image(root, "weave/test/good/short.png", "weave", "test", size=(48, 20))
    return with_rows(df, row), [row["path"]]


def two_channels(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    row = add_image(root, "weave/train/good/gray_alpha.png", "weave", "train", mode="LA")
    assert row["channels"] == 2
    return with_rows(df, row), [row["path"]]


def too_few_train_normals(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    df = df.drop(index=first(df, category="weave", split="train")).reset_index(drop=True)
    return df, [df.at[first(df, category="weave"), "path"]]  # the category's first row carries its count


def category_only_in_test(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    row = add_image(root, "nut/test/good/000.png", "nut", "test")
    return with_rows(df, row), [row["path"]]


def anomalous_in_train(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    row = add_image(root, "metal/train/scratch/000.png", "metal", "train", "scratch", mask_size=SIZE)
    return with_rows(df, row), [row["path"]]


def bad_split(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    i = first(df, split="test", label=0)
    df.loc[i, "split"] = "val"
    return df, [df.at[i, "path"]]


def label_contradicts_defect_type(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    i = first(df, split="test", label=0)
    df.loc[i, "defect_type"] = "scratch"
    return df, [df.at[i, "path"]]


def null_sha256(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, list[str]]:
    i = first(df, split="train")
    df.loc[i, "sha256"] = None
    return df, [df.at[i, "path"]]


BAD_CASES: list[tuple[Case, set[str]]] = [
    (missing_mask, {"anomalous test images have masks"}),
    (unreadable_mask, {"every mask decodes"}),
    (mask_wrong_size, {"mask width matches image width", "mask height matches image height"}),
    (train_file_copied_to_test, {"no image in both train and test"}),
    (undecodable_file, {"every image decodes"}),
    (too_narrow, {"image width within bounds"}),
    (too_short, {"image height within bounds"}),
    (two_channels, {"channels allowed"}),
    (too_few_train_normals, {"enough normal train images per category"}),
    (category_only_in_test, {"enough normal train images per category"}),
    (anomalous_in_train, {"no anomalous images in train"}),
    (bad_split, {"split is train or test"}),
    (label_contradicts_defect_type, {"label matches defect_type"}),
    (null_sha256, {"sha256 is never null"}),
]


Validate = Callable[..., ValidationReport]


def test_good_manifest_passes(good_manifest: pd.DataFrame, validate: Validate) -> None:
    report = validate(good_manifest)
    assert failed(report) == {}
    assert report.success
    assert (report.evaluated_expectations, report.rows) == (N_EXPECTATIONS, len(good_manifest))
    assert report.summary() == f"manifest valid: {N_EXPECTATIONS} expectations passed on 10 rows"
    report.raise_for_failures()


@pytest.mark.parametrize(("make_bad", "expected"), BAD_CASES, ids=[c.__name__ for c, _ in BAD_CASES])
def test_bad_manifest_fails_naming_expectation_and_paths(
    make_bad: Case, expected: set[str], good_manifest: pd.DataFrame, dataset_root: Path, validate: Validate
) -> None:
    bad, paths = make_bad(good_manifest, dataset_root)
    report = validate(bad)
    assert not report.success
    assert set(failed(report)) == expected
    for name in expected:
        assert set(paths) <= set(failed(report)[name]), name
    with pytest.raises(DataValidationError) as err:
        report.raise_for_failures()
    message = str(err.value)
    assert message == report.summary()
    assert all(name in message for name in expected) and all(p in message for p in paths)


def test_failing_categories_are_quoted_with_counts(
    good_manifest: pd.DataFrame, dataset_root: Path, validate: Validate
) -> None:
    bad, _ = too_few_train_normals(good_manifest, dataset_root)
    bad, _ = category_only_in_test(bad, dataset_root)
    (failure,) = validate(bad).failures
    assert failure.unexpected_count == 2  # one per failing category
    quoted = {(ex["category"], ex[TRAIN_NORMAL_IN_CATEGORY]) for ex in failure.examples}
    assert quoted == {("weave", 2), ("nut", 0)}


def test_examples_are_capped(good_manifest: pd.DataFrame, validate: Validate) -> None:
    good_manifest["channels"] = pd.array([2] * len(good_manifest), dtype="Int64")
    report = validate(good_manifest, example_rows=2)
    (failure,) = report.failures
    assert (failure.expectation, failure.unexpected_count) == ("channels allowed", 10)
    assert [ex["channels"] for ex in failure.examples] == [2, 2]
    assert "... and 8 more" in report.summary()


def test_missing_column_is_named(good_manifest: pd.DataFrame, validate: Validate) -> None:
    report = validate(good_manifest.drop(columns=["sha256"]))
    messages = {f.expectation: f.message for f in report.failures}
    assert messages == {
        "manifest has the required columns": "missing columns: sha256",
        "sha256 is never null": "could not be evaluated: "
        'Error: The column "sha256" in BatchData does not exist.',
        "no image in both train and test": "could not be evaluated: "
        "helper column sha256_in_train_and_test needs manifest column(s) split, sha256",
    }


def test_outputs_are_written_and_replaced(
    good_manifest: pd.DataFrame, dataset_root: Path, validate: Validate, tmp_path: Path
) -> None:
    bad, paths = missing_mask(good_manifest.copy(), dataset_root)
    report = validate(bad)
    written = json.loads((tmp_path / "validation.json").read_text())
    assert written["report"] == json.loads(json.dumps(report.to_dict()))
    assert written["report"]["failures"][0]["examples"][0]["path"] == paths[0]
    gx_result = written["gx_result"]
    assert gx_result["success"] is False and len(gx_result["results"]) == N_EXPECTATIONS
    assert (tmp_path / "data_docs" / "index.html").is_file()
    (page,) = (tmp_path / "data_docs" / "validations").rglob("*.html")
    description = ("anomalous test images have masks: mask_path set where label is 1 and split is test, "
                   "in every category that has masks")
    assert description in page.read_text()

    validate(good_manifest)  # a second run replaces the first one's outputs
    assert json.loads((tmp_path / "validation.json").read_text())["report"]["success"] is True
    pages = list((tmp_path / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 1 and not page.exists()
