"""Tiny settings for tests: import as `from tiny import tiny_settings` (tests/ is on sys.path)."""

from __future__ import annotations

from plantad.config import Settings, load_settings

TINY = [
    "model.teacher.weights=random",
    "model.teacher.timm_kwargs={depth: 4, embed_dim: 64, num_heads: 2, patch_size: 8, init_values: 1.0}",
    "model.teacher.layers=[0,1,2,3]",
    "model.teacher.groups=[[0,1],[2,3]]",
    "data.image_size=56",
    "train.batch_size=8",
    "train.steps=40",
    "train.warmup_steps=5",
    "train.hard_mining.ramp_steps=20",
    "scoring.gaussian_sigma=1.0",
    "scoring.batch_size=16",
    "data.holdout_fraction=0.15",
]


def tiny_settings(*extra: str) -> Settings:
    """Defaults + a 4-block, width-64 ViT teacher (8-px patches, 7x7 grid) at 56 px."""
    return load_settings(None, [*TINY, *extra])
