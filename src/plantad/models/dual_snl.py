"""`model.method: dual_snl`: SNL's structural losses and CRAM on the dual model's encoder-decoder
branch (S_D); the semantic branch and the Noisy-OR fusion are the dual model's.

[reconstructed] A CRAM follows every S_D decoder block (its output feeds the next block). The local
loss is Dinomaly's global cosine loss with hard mining plus, per layer group, the four structural
losses of models/structural.py; the local map is the per-patch cosine distance plus
`model.snl.map_intra_weight` x the intra-affinity distance. The image score stays the dual model's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plantad.config import ModelConfig
from plantad.models.dual import DualStudentModel
from plantad.models.losses import global_cosine_hard_mining
from plantad.models.structural import CRAM, intra_affinity_distance, structural_loss


class DualSNLModel(DualStudentModel):
    def __init__(self, cfg: ModelConfig, image_size: int, load_teacher_weights: bool = True) -> None:
        if cfg.method != "dual_snl":
            raise ValueError(f"DualSNLModel cannot build model.method={cfg.method!r}")
        super().__init__(cfg, image_size, load_teacher_weights)
        snl = cfg.snl
        if self.decoder is not None and snl.cram:
            dim = self.teacher.embed_dim
            self.decoder.blocks = nn.ModuleList(
                nn.Sequential(block, CRAM(dim, snl.num_centers, snl.cram_residual_weight)) for block in self.decoder.blocks
            )

    def _local_loss(self, targets: list[torch.Tensor], preds: list[torch.Tensor], easy_fraction: float,
                    easy_factor: float) -> torch.Tensor:
        base = global_cosine_hard_mining(targets, preds, easy_fraction, easy_factor)
        structural = torch.stack([structural_loss(t.float(), s.float(), self.cfg.snl) for t, s in zip(targets, preds)])
        return base + structural.mean()

    def _local_map(self, targets: list[torch.Tensor], preds: list[torch.Tensor]) -> torch.Tensor:
        base = super()._local_map(targets, preds)  # (B, N)
        w = self.cfg.snl.map_intra_weight
        if w == 0.0:
            return base
        intra = torch.stack([intra_affinity_distance(t.float(), s.float()) for t, s in zip(targets, preds)])
        return base + w * intra.mean(dim=0)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "local_branch": "SNL: CRAM after each S_D block, global cosine + structural losses",
                "map": "per-patch cosine distance + map_intra_weight x intra-affinity distance, mean over groups"}
