"""Inputs and expectations for the bulk-scoring tests: demo images plus corrupt files, and the rows
that in-process `score_batch` gives for them (what every bulk run must equal)."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from plantad.config import Settings
from plantad.data.images import ImageDecodeError, ImageTransform, decode_untrusted
from plantad.models.checkpoint import load_model
from plantad.scoring import score_batch
from tiny import tiny_settings

MAX_PIXELS = 20_000  # the demo's 64x64 images pass, the 200x200 "oversized" one does not
SCORE_COLUMNS = ["probability", "p_local", "p_semantic", "local_score", "semantic_score", "threshold"]


def bulk_settings(*extra: str) -> Settings:
    return tiny_settings("bulk.part_size=8", "bulk.batch_size=8", "bulk.actors=1", "bulk.cpus_per_actor=1",
                         "bulk.read_cpus=0.25", f"bulk.max_image_pixels={MAX_PIXELS}", *extra)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def corrupt_files(good_png: bytes) -> dict[str, bytes]:
    """Relative path -> bytes of files that must become error rows (plus one that is not an image)."""
    big = np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    return {
        "bad/truncated.png": good_png[: len(good_png) // 2],
        "bad/not_an_image.png": b"this is a text file, not a PNG",
        "bad/empty.jpg": b"",
        "bad/oversized.png": png(big),
    }


def make_input(demo_root: Path, dest: Path, splits: tuple[str, ...] = ("test",), limit: int | None = None) -> list[str]:
    """Copy demo images (keeping their relative paths) and the corrupt files into `dest`."""
    rels = sorted(str(p.relative_to(demo_root)) for p in demo_root.rglob("*.png")
                  if p.relative_to(demo_root).parts[1] in splits and "ground_truth" not in p.parts)[:limit]
    for rel in rels:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(demo_root / rel, dest / rel)
    for rel, data in corrupt_files((demo_root / rels[0]).read_bytes()).items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
    (dest / "notes.txt").write_text("not listed: the extension is not in bulk.extensions")
    return sorted([*rels, *corrupt_files(b"x")])


def expected_rows(files: dict[str, bytes], model_dir: Path) -> pd.DataFrame:
    """In-process reference: decode_untrusted + ImageTransform + score_batch, indexed by relpath."""
    model, meta = load_model(model_dir)
    settings = Settings.model_validate(meta["settings"])
    transform = ImageTransform(settings.data.image_size)
    good, rows = [], []
    for rel, data in sorted(files.items()):
        row = {"relpath": rel, "sha256": hashlib.sha256(data).hexdigest(), "error": None}
        try:
            img = decode_untrusted(data, rel, max_pixels=MAX_PIXELS)
            good.append((row, transform(img.image)))
            row.update(width=img.width, height=img.height)
        except ImageDecodeError as exc:
            row["error"] = str(exc)
        rows.append(row)
    out = score_batch(model, torch.stack([x for _, x in good]), settings.scoring)
    for i, (row, _) in enumerate(good):
        row.update(probability=float(out.probability[i]), is_anomalous=bool(out.is_anomalous[i]),
                   p_local=float(out.p_local[i]), p_semantic=float(out.p_semantic[i]),
                   local_score=float(out.local_score[i]), semantic_score=float(out.semantic_score[i]),
                   threshold=float(model.noisy_or.threshold))
    return pd.DataFrame(rows).set_index("relpath")


def folder_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.suffix != ".txt"}


def assert_rows_match(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """One row per expected image, scores equal to in-process score_batch, errors where expected."""
    assert got["relpath"].is_unique and sorted(got["relpath"]) == sorted(want.index)
    got = got.set_index("relpath").loc[want.index]
    assert list(got["sha256"]) == list(want["sha256"])
    failed = want["error"].notna()
    assert list(got.index[got["error"].notna()]) == list(want.index[failed])
    for rel in want.index[failed]:
        assert rel.split("/")[-1] in got.loc[rel, "error"], got.loc[rel, "error"]
    assert got.loc[failed, "probability"].isna().all() and got.loc[failed, "is_anomalous"].isna().all()
    ok = want.index[~failed]
    for col in SCORE_COLUMNS:
        np.testing.assert_allclose(got.loc[ok, col].astype(float), want.loc[ok, col].astype(float),
                                   rtol=1e-5, atol=1e-6, err_msg=col)
    assert list(got.loc[ok, "is_anomalous"].astype(bool)) == list(want.loc[ok, "is_anomalous"].astype(bool))
    assert list(got.loc[ok, "width"]) == list(want.loc[ok, "width"])


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """A table without its timestamps, sorted by path, for comparing two runs."""
    return df.drop(columns=["scored_at"]).sort_values("relpath").reset_index(drop=True)
