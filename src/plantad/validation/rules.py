"""The manifest suite as data: one named GX expectation per rule, plus the columns its examples quote.

Names are stable (reports, tests and dashboards key on them); the description adds the parameters
and is what GX's data docs show in place of its own template sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plantad.config import ValidationConfig
from plantad.validation.derived import (
    CATEGORY_HAS_MASKS,
    LABEL_FROM_DEFECT_TYPE,
    SHA256_IN_TRAIN_AND_TEST,
    TRAIN_NORMAL_IN_CATEGORY,
)
from plantad.validation.gx_loader import load_gx

NON_NULL_COLUMNS = ("path", "category", "split", "label", "defect_type", "sha256")
# every manifest column the suite reads (mean/std intensity are not checked)
REQUIRED_COLUMNS = NON_NULL_COLUMNS + (
    "mask_path", "width", "height", "channels", "mask_width", "mask_height", "decode_error",
)  # fmt: skip
INDEX_COLUMNS = ("row", "path", "category", "split")  # GX quotes these for every unexpected row
MASK_SIZE = ("mask_path", "width", "height", "mask_width", "mask_height")


@dataclass(frozen=True)
class Rule:
    name: str
    expectation: Any  # a great_expectations Expectation, its meta carrying `name`
    show: tuple[str, ...] = ()  # extra columns quoted in examples besides the checked ones


def manifest_rules(cfg: ValidationConfig) -> list[Rule]:
    """The suite's rules in report order; cfg supplies bounds, channels and the per-category minimum."""
    gx = load_gx()
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    rules: list[Rule] = []

    def add(name: str, detail: str, expectation_cls: type, show: tuple[str, ...] = (), **kwargs: Any) -> None:
        exp = expectation_cls(**kwargs, meta={"name": name}, description=f"{name}: {detail}")
        rules.append(Rule(name, exp, show))

    # 1. required columns present and non-null
    add("manifest has the required columns", "columns " + ", ".join(REQUIRED_COLUMNS),
        E.ExpectTableColumnsToMatchSet, column_set=list(REQUIRED_COLUMNS), exact_match=False)
    for col in NON_NULL_COLUMNS:
        add(f"{col} is never null", f"every row has a {col}", E.ExpectColumnValuesToNotBeNull, column=col)
    # 2. split and label values, label consistent with defect_type, train is normal only
    add("split is train or test", "split in {train, test}", E.ExpectColumnValuesToBeInSet,
        column="split", value_set=["train", "test"])
    add("label is 0 or 1", "label in {0, 1}", E.ExpectColumnValuesToBeInSet, column="label", value_set=[0, 1])
    add("label matches defect_type", "label is 1 exactly when defect_type is not 'good'",
        E.ExpectColumnPairValuesToBeEqual, show=("defect_type",), column_A="label",
        column_B=LABEL_FROM_DEFECT_TYPE, ignore_row_if="either_value_is_missing")
    add("no anomalous images in train", "label is 0 on every train row", E.ExpectColumnValuesToBeInSet,
        show=("defect_type",), column="label", value_set=[0], row_condition=Column("split") == "train")
    # 3. masks are optional per category (image-level datasets); a category that has masks has one
    # for every anomalous test image, and each is the size of its image
    add("anomalous test images have masks",
        "mask_path set where label is 1 and split is test, in every category that has masks",
        E.ExpectColumnValuesToNotBeNull, show=("label", "defect_type"), column="mask_path",
        row_condition=(Column("label") == 1) & (Column("split") == "test")
        & (Column(CATEGORY_HAS_MASKS) == True))  # noqa: E712  (a GX row condition, not a Python test)
    has_mask = Column("mask_path").is_not_null()
    # GX's pair check errors on nulls ("boolean value of NA is ambiguous"), so it skips them and a
    # mask the manifest could not measure fails here instead
    add("every mask decodes", "mask_width is known wherever mask_path is set",
        E.ExpectColumnValuesToNotBeNull, show=MASK_SIZE, column="mask_width", row_condition=has_mask)
    for dim in ("width", "height"):
        add(f"mask {dim} matches image {dim}", f"mask_{dim} equals {dim} wherever mask_path is set",
            E.ExpectColumnPairValuesToBeEqual, show=MASK_SIZE, column_A=f"mask_{dim}", column_B=dim,
            ignore_row_if="either_value_is_missing", row_condition=has_mask)
    # 4. image geometry
    add("image width within bounds", f"{cfg.min_width} <= width <= {cfg.max_width}",
        E.ExpectColumnValuesToBeBetween, show=("height",), column="width",
        min_value=cfg.min_width, max_value=cfg.max_width)
    add("image height within bounds", f"{cfg.min_height} <= height <= {cfg.max_height}",
        E.ExpectColumnValuesToBeBetween, show=("width",), column="height",
        min_value=cfg.min_height, max_value=cfg.max_height)
    add("channels allowed", f"channels in {sorted(cfg.allowed_channels)}", E.ExpectColumnValuesToBeInSet,
        column="channels", value_set=list(cfg.allowed_channels))
    # 5. enough normal training data per category (helper set on one row per category)
    add("enough normal train images per category",
        f"at least {cfg.min_train_normal_per_category} normal train images in each category",
        E.ExpectColumnValuesToBeBetween, column=TRAIN_NORMAL_IN_CATEGORY,
        min_value=cfg.min_train_normal_per_category)
    # 6. leakage: identical file content in train and test
    add("no image in both train and test", "no sha256 occurs in both splits", E.ExpectColumnValuesToBeInSet,
        show=("sha256",), column=SHA256_IN_TRAIN_AND_TEST, value_set=[False])
    # 7. decodable files
    add("every image decodes", "decode_error is null", E.ExpectColumnValuesToBeNull, column="decode_error")

    names = [r.name for r in rules]
    assert len(names) == len(set(names)), f"duplicate rule names: {names}"
    return rules
