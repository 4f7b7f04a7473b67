"""Cross-class interference probes: mixups and pastes of two normal categories."""

from __future__ import annotations

import numpy as np
import pytest

from plantad.evaluation.interference import interference_probes, mixup, paste_patch


def test_mixup_is_the_pixel_average() -> None:
    a = np.full((4, 4, 3), 10, np.uint8)
    b = np.full((4, 4, 3), 31, np.uint8)
    assert (mixup(a, b) == 20).all() and (mixup(a, b, weight=0.0) == a).all()
    with pytest.raises(ValueError, match="one shape"):
        mixup(a, b[:2])


def test_paste_copies_one_square_of_the_other_image() -> None:
    a = np.zeros((20, 20, 3), np.uint8)
    b = np.arange(20 * 20 * 3, dtype=np.int64).reshape(20, 20, 3).astype(np.uint8)
    out = paste_patch(a, b, np.random.default_rng(0), side_fraction=0.25)
    changed = (out != 0).any(axis=-1)
    ys, xs = np.nonzero(changed)
    assert ys.max() - ys.min() + 1 <= 5 and xs.max() - xs.min() + 1 <= 5 and changed.sum() >= 20
    assert (a == 0).all()  # the input is not modified


def test_probes_pair_every_two_categories(demo_root, demo_manifest) -> None:
    probes = interference_probes(demo_manifest, demo_root, per_pair=2, seed=0)
    pairs = {(p.base, p.other) for p in probes}
    assert pairs == {(a, b) for a in ("metal", "nut", "weave") for b in ("metal", "nut", "weave") if a != b}
    assert len(probes) == 6 * 2 * 2 and {p.kind for p in probes} == {"mixup", "paste"}
    assert all(p.image.size == (64, 64) and p.image.mode == "RGB" for p in probes)
    with pytest.raises(ValueError, match="2\\+ categories"):
        interference_probes(demo_manifest[demo_manifest["category"] == "nut"], demo_root, per_pair=1)
