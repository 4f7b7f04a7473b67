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

# SNL's CNN teacher, tiny: a 1-block-per-stage ResNet-18 of width 16 (the production default is
# wide_resnet50_2 with timm_kwargs {}); stages 1-3 at 56 px give 14x14, 7x7 and 4x4 maps
TINY_CNN = [
    "model.snl.cnn_teacher.name=resnet18",
    "model.snl.cnn_teacher.weights=random",
    "model.snl.cnn_teacher.timm_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 128], stem_width: 16}",
    "model.snl.num_centers=4",
]


def tiny_method_settings(method: str, *extra: str) -> Settings:
    """Tiny settings for any model.method (SNL with the tiny CNN teacher unless overridden)."""
    return tiny_settings(f"model.method={method}", *TINY_CNN, *extra)
