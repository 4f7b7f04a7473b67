"""The procedural demo dataset: layout, determinism, masks, visibility, appending normal images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_helpers import SMALL, file_hashes, random_pixels, write_image
from PIL import Image
from scipy.stats import rankdata

from plantad.config import DemoConfig
from plantad.data.demo import add_normal, generate_demo
from plantad.data.layout import DatasetLayoutError
from plantad.data.demo import render_sample, sample_rng
from plantad.data.demo_defects import DEFECTS, MAX_AREA, MIN_AREA, add_defect
from plantad.data.demo_textures import render_normal


def test_layout_counts_and_names(demo_root: Path) -> None:
    assert sorted(p.name for p in demo_root.iterdir()) == ["metal", "nut", "weave"]
    for category, defects in DEFECTS.items():
        base = demo_root / category
        assert sorted(p.name for p in base.iterdir()) == ["ground_truth", "test", "train"]
        train = sorted(p.name for p in (base / "train" / "good").iterdir())
        assert train == [f"{i:03d}.png" for i in range(SMALL.n_train)]
        assert len(list((base / "test" / "good").iterdir())) == SMALL.n_test_good
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted([*defects, "good"])
        for defect in defects:
            images = sorted(p.stem for p in (base / "test" / defect).iterdir())
            masks = sorted(p.name for p in (base / "ground_truth" / defect).iterdir())
            assert images == [f"{i:03d}" for i in range(SMALL.n_test_defect)]
            assert masks == [f"{stem}_mask.png" for stem in images]
    with Image.open(demo_root / "nut" / "train" / "good" / "000.png") as im:
        assert (im.size, im.mode) == ((SMALL.image_size, SMALL.image_size), "RGB")


def test_same_seed_is_byte_identical_other_seed_differs(demo_root: Path, tmp_path: Path) -> None:
    again = generate_demo(tmp_path / "again", SMALL)
    assert file_hashes(again) == file_hashes(demo_root)
    other = file_hashes(generate_demo(tmp_path / "other", SMALL.model_copy(update={"seed": 4})))
    assert other.keys() == file_hashes(demo_root).keys()
    images = [k for k in other if not k.endswith("_mask.png")]
    assert all(other[k] != file_hashes(demo_root)[k] for k in images)


def test_images_are_unique_and_a_category_does_not_depend_on_the_others(
    demo_root: Path, tmp_path: Path
) -> None:
    hashes = file_hashes(demo_root)
    images = [h for k, h in hashes.items() if not k.endswith("_mask.png")]
    assert len(set(images)) == len(images)
    nut_only = file_hashes(generate_demo(tmp_path / "nut", SMALL.model_copy(update={"categories": ["nut"]})))
    assert all(hashes[k] == h for k, h in nut_only.items())


def test_masks_binary_same_size_and_within_area_bounds(demo_root: Path) -> None:
    masks = sorted(demo_root.glob("*/ground_truth/*/*_mask.png"))
    assert len(masks) == SMALL.n_test_defect * sum(len(d) for d in DEFECTS.values())
    for mask_path in masks:
        defect, name = mask_path.parent.name, mask_path.name.replace("_mask", "")
        image_path = mask_path.parents[2] / "test" / defect / name
        with Image.open(mask_path) as m, Image.open(image_path) as im:
            assert m.mode == "L" and m.size == im.size
            mask = np.asarray(m)
        assert set(np.unique(mask)) == {0, 255}, mask_path
        assert MIN_AREA <= (mask > 0).mean() <= MAX_AREA, mask_path


@pytest.mark.parametrize("category", sorted(DEFECTS))
def test_defects_change_pixels_only_inside_their_mask(category: str) -> None:
    for defect in DEFECTS[category]:
        changes = []
        for index in range(6):
            rng = sample_rng(11, category, "test", defect, index)
            scene = render_normal(category, rng, 64)
            image, mask = add_defect(defect, category, scene, rng, 64)
            change = np.abs(image - scene.image).max(axis=2)
            assert change[~mask].max() == 0, (defect, index)
            changes.append(change[mask].mean())
        # some defects are subtle (e.g. metal pasted on the nut), typical ones clearly visible
        assert min(changes) > 0.03 and np.median(changes) > 0.15, (defect, changes)


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = rankdata(scores)
    n_pos, n_neg = labels.sum(), len(labels) - labels.sum()
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.mark.parametrize("category", sorted(DEFECTS))
def test_global_image_statistics_do_not_separate_defects(category: str) -> None:
    """Defects are local: mean or contrast of the whole image must not already detect them."""
    samples = [(render_sample(5, category, "test", "good", i, 48)[0], 0) for i in range(16)]
    for defect in DEFECTS[category]:
        samples += [(render_sample(5, category, "test", defect, i, 48)[0], 1) for i in range(6)]
    labels = np.array([y for _, y in samples])
    for statistic in (np.mean, np.std):
        auc = _auroc(np.array([statistic(img / 255.0) for img, _ in samples]), labels)
        assert max(auc, 1 - auc) < 0.9, (statistic.__name__, auc)


def test_generate_refuses_non_empty_folder(demo_root: Path, tmp_path: Path) -> None:
    before = file_hashes(demo_root)
    with pytest.raises(FileExistsError, match="never overwrites"):
        generate_demo(demo_root, SMALL)
    assert file_hashes(demo_root) == before
    (tmp_path / "empty").mkdir()
    tiny = DemoConfig(image_size=32, n_train=2, n_test_good=1, n_test_defect=1, categories=["metal"])
    assert generate_demo(tmp_path / "empty", tiny) == tmp_path / "empty"
    assert len(file_hashes(tmp_path / "empty")) == 2 + 1 + 3 * 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_add_normal_appends_without_touching_existing(demo_root: Path, tmp_path: Path) -> None:
    root = generate_demo(tmp_path / "data", SMALL)
    before = file_hashes(root)
    added = add_normal(root, 3, seed=SMALL.seed, image_size=SMALL.image_size)
    after = file_hashes(root)
    assert {k: after[k] for k in before} == before
    new = {p.relative_to(root).as_posix() for p in added}
    assert new == set(after) - set(before) and len(new) == 9
    assert {f"nut/train/good/{i:03d}.png" for i in (6, 7, 8)} <= new
    image_hashes = [h for k, h in after.items() if not k.endswith("_mask.png")]
    assert len(set(image_hashes)) == len(image_hashes)
    # the appended images are exactly those a larger n_train would have generated
    bigger = file_hashes(generate_demo(tmp_path / "bigger", SMALL.model_copy(update={"n_train": 9})))
    assert after == bigger


def test_add_normal_continues_numbering_per_category_and_seed(tmp_path: Path) -> None:
    root = generate_demo(tmp_path / "data", SMALL.model_copy(update={"categories": ["weave", "metal"]}))
    (root / "weave" / "train" / "good" / "005.png").unlink()
    (root / "weave" / "train" / "good" / "002.png").unlink()
    added = add_normal(root, 2, seed=99, image_size=SMALL.image_size, categories=["weave"])
    assert [p.name for p in added] == ["005.png", "006.png"]
    other = tmp_path / "other"
    generate_demo(other, SMALL.model_copy(update={"categories": ["weave"]}))
    (other / "weave" / "train" / "good" / "005.png").unlink()
    again = add_normal(other, 2, seed=99, image_size=SMALL.image_size)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in added]


def test_add_normal_rejects_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        add_normal(tmp_path / "absent", 1, seed=0, image_size=32)
    (tmp_path / "loose").mkdir()
    write_image(tmp_path / "loose" / "a.png", random_pixels(0, (32, 32, 3)))
    with pytest.raises(DatasetLayoutError, match="not an MVTec-AD layout"):
        add_normal(tmp_path / "loose", 1, seed=0, image_size=32)
    write_image(tmp_path / "mv" / "screw" / "train" / "good" / "000.png", random_pixels(0, (32, 32, 3)))
    with pytest.raises(ValueError, match="cannot generate images for category \\['screw'\\]"):
        add_normal(tmp_path / "mv", 1, seed=0, image_size=32)
    with pytest.raises(DatasetLayoutError, match="\\['nut'\\] not found"):
        add_normal(tmp_path / "mv", 1, seed=0, image_size=32, categories=["nut"])
    write_image(tmp_path / "mv" / "metal" / "train" / "good" / "000.png", random_pixels(0, (32, 32, 3)))
    with pytest.raises(ValueError, match="32x32 but image_size=48"):
        add_normal(tmp_path / "mv", 1, seed=0, image_size=48, categories=["metal"])
