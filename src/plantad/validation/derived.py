"""Helper columns that turn the suite's cross-row rules into per-row GX column expectations.

Each helper is only added when the manifest columns it is computed from exist; when they do not,
the expectation on the helper fails with GX's "column does not exist" error instead of passing on
an all-null column.
"""

from __future__ import annotations

import pandas as pd

ROW = "row"  # manifest row number (0-based), quoted in every example
LABEL_FROM_DEFECT_TYPE = "label_from_defect_type"
TRAIN_NORMAL_IN_CATEGORY = "train_normal_images_in_category"
SHA256_IN_TRAIN_AND_TEST = "sha256_in_train_and_test"
CATEGORY_HAS_MASKS = "category_has_masks"

DERIVED_FROM = {  # helper column -> the manifest columns it is computed from
    LABEL_FROM_DEFECT_TYPE: ("defect_type",),
    TRAIN_NORMAL_IN_CATEGORY: ("category", "split", "label"),
    SHA256_IN_TRAIN_AND_TEST: ("split", "sha256"),
    CATEGORY_HAS_MASKS: ("category", "mask_path"),
}
DERIVED_COLUMNS = (ROW, *DERIVED_FROM)


def label_from_defect_type(defect_type: pd.Series) -> pd.Series:
    """0 for 'good', 1 for any other defect type, null where defect_type is null."""
    label = (defect_type != "good").astype("Int64")
    return label.mask(defect_type.isna())


def train_normal_count_per_category(df: pd.DataFrame) -> pd.Series:
    """Normal training images of each category, set on the first row of the category (else null).

    One row per category keeps unexpected_count = number of failing categories and makes the quoted
    examples name distinct categories.
    """
    is_train_normal = (df["split"] == "train") & (df["label"] == 0)
    counts = is_train_normal.fillna(False).astype(int).groupby(df["category"]).sum()
    first_rows = df["category"].dropna().drop_duplicates(keep="first")
    out = pd.Series(pd.NA, index=df.index, dtype="Int64")
    out.loc[first_rows.index] = counts.loc[first_rows.to_numpy()].to_numpy()
    return out


def sha256_in_train_and_test(df: pd.DataFrame) -> pd.Series:
    """True on every row whose file content (sha256) occurs in both the train and the test split."""
    train = set(df.loc[df["split"] == "train", "sha256"].dropna())
    test = set(df.loc[df["split"] == "test", "sha256"].dropna())
    return df["sha256"].isin(train & test).astype(bool)


def category_has_masks(df: pd.DataFrame) -> pd.Series:
    """True on every row of a category where at least one image has a mask.

    Masks are optional per category (image-level datasets have none), but a category with some masks
    must have them for every anomalous test image: a partly masked category would give pixel metrics
    over an arbitrary subset of its defects.
    """
    masked = set(df.loc[df["mask_path"].notna(), "category"].dropna())
    return df["category"].isin(masked).astype(bool)


def with_derived_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    """A copy of the manifest with a fresh 0-based index and the helper columns the suite reads."""
    clash = [c for c in DERIVED_COLUMNS if c in manifest.columns]
    if clash:
        raise ValueError(f"manifest has column(s) {clash} that validation derives itself; rename them")
    df = manifest.reset_index(drop=True)
    df.insert(0, ROW, range(len(df)))
    helpers = {
        LABEL_FROM_DEFECT_TYPE: lambda: label_from_defect_type(df["defect_type"]),
        TRAIN_NORMAL_IN_CATEGORY: lambda: train_normal_count_per_category(df),
        SHA256_IN_TRAIN_AND_TEST: lambda: sha256_in_train_and_test(df),
        CATEGORY_HAS_MASKS: lambda: category_has_masks(df),
    }
    for name, compute in helpers.items():
        if all(c in df.columns for c in DERIVED_FROM[name]):
            df[name] = compute()
    return df
