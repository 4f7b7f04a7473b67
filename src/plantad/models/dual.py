"""The dual-student model: frozen teacher, S_D (local) and S_E (semantic), Noisy-OR calibration.

A plain nn.Module: in training mode `forward` returns the loss terms of the joint objective, in
eval mode the raw per-patch and semantic distances. Maps, image scores and decisions are made by
`plantad.scoring`, the one code path every consumer uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plantad.config import ModelConfig, ScoringConfig
from plantad.models.decoder_student import DecoderStudent, group_teacher_layers
from plantad.models.encoder_student import EncoderStudent, SharedEncoderStudent
from plantad.models.interface import LossTerms, RawScores
from plantad.models.losses import global_cosine_hard_mining, local_distance_map, semantic_distance
from plantad.models.noisy_or import NoisyOr
from plantad.models.teacher import Teacher, TeacherFeatures


class DualStudentModel(nn.Module):
    optimizer_recipe = "dinomaly"  # S_D and S_E (and dual_snl's S_D) train with Dinomaly's AdamW

    def __init__(self, cfg: ModelConfig, image_size: int, load_teacher_weights: bool = True) -> None:
        super().__init__()
        if cfg.method not in ("dual", "dual_snl"):  # dual_snl: models/dual_snl.py
            raise ValueError(f"DualStudentModel cannot build model.method={cfg.method!r}")
        self.cfg = cfg
        self.image_size = image_size
        semantic = cfg.branches in ("dual", "semantic")
        shared = cfg.encoder.shared_blocks if semantic else 0
        # one teacher forward serves both students; it runs to the end only when S_E needs its class token
        self.teacher = Teacher(cfg.teacher, image_size, load_teacher_weights, final=semantic, share_blocks=shared,
                               patch_mean=cfg.encoder.distill_patch_mean)
        t = self.teacher
        self.decoder: DecoderStudent | None = None
        self.encoder: EncoderStudent | SharedEncoderStudent | None = None
        if cfg.branches in ("dual", "local"):
            self.decoder = DecoderStudent(
                cfg.decoder, t.embed_dim, len(t.layers), cfg.teacher.groups, t.num_heads, t.num_prefix_tokens
            )
        if semantic:
            self.encoder = (SharedEncoderStudent(cfg.encoder, cfg.teacher, image_size, len(t.vit.blocks)) if shared
                            else EncoderStudent(cfg.encoder, cfg.teacher, image_size, t.patch_size))
        self.noisy_or = NoisyOr(cfg.noisy_or)

    def student_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters per student (the teacher is frozen)."""
        groups = {"local": self.decoder, "semantic": self.encoder}
        return {k: [p for p in m.parameters() if p.requires_grad] for k, m in groups.items() if m is not None}

    def forward(self, x: torch.Tensor, easy_fraction: float = 0.0, easy_factor: float = 1.0) -> LossTerms | RawScores:
        feats = self.teacher(x)
        if self.training:
            return self._losses(x, feats, easy_fraction, easy_factor)
        return self._raw_scores(x, feats)

    def _local_pairs(self, feats: TeacherFeatures) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        assert self.decoder is not None
        targets = group_teacher_layers(feats.layers, self.cfg.teacher.groups)
        return targets, self.decoder(feats.layers, feats.prefix)

    def _local_loss(self, targets: list[torch.Tensor], preds: list[torch.Tensor], easy_fraction: float,
                    easy_factor: float) -> torch.Tensor:
        return global_cosine_hard_mining(targets, preds, easy_fraction, easy_factor)

    def _local_map(self, targets: list[torch.Tensor], preds: list[torch.Tensor]) -> torch.Tensor:
        return local_distance_map(targets, preds)  # (B, N)

    def image_score(self, anomaly_map: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
        """Mean of the top `scoring.top_k_fraction` of the smoothed map [read, Dinomaly]."""
        from plantad.scoring import top_k_mean

        return top_k_mean(anomaly_map, cfg.top_k_fraction)

    def describe(self) -> dict[str, Any]:
        facts = {"map": "per-patch cosine distance, mean over groups",
                 "image_score": "mean of the top scoring.top_k_fraction of the smoothed map"}
        if self.encoder is not None:
            k = self.cfg.encoder.shared_blocks
            facts["semantic_student"] = (f"shares the teacher's patch embedding and first {k} blocks, trains "
                                         f"{len(self.encoder.blocks)} blocks [reconstructed]" if k else
                                         "a whole ViT from scratch on the image (the paper's S_E)")
            if getattr(self.encoder, "downscale", None) is not None:
                facts["semantic_student"] += (f", on the image downscaled to {self.encoder.view_size} px; its target is "
                                              "the teacher's class token at full size [reconstructed]")
        return facts

    def _semantic(self, x: torch.Tensor, feats: TeacherFeatures) -> torch.Tensor:
        assert self.encoder is not None
        out = self.encoder(x if feats.shared is None else feats.shared)
        if self.cfg.encoder.distill_patch_mean:
            return semantic_distance(feats.cls, out.cls, feats.patch_mean, out.patch_mean)
        return semantic_distance(feats.cls, out.cls)

    def _losses(self, x: torch.Tensor, feats: TeacherFeatures, easy_fraction: float, easy_factor: float) -> LossTerms:
        local = semantic = None
        if self.decoder is not None:
            targets, preds = self._local_pairs(feats)
            local = self._local_loss(targets, preds, easy_fraction, easy_factor)
        if self.encoder is not None:
            semantic = self._semantic(x, feats).mean()
        w_local, w_sem = self.noisy_or.training_weights(local, semantic)
        total = sum(w * loss for w, loss in ((w_local, local), (w_sem, semantic)) if loss is not None)
        return LossTerms(total, local, semantic, w_local, w_sem)

    def _raw_scores(self, x: torch.Tensor, feats: TeacherFeatures) -> RawScores:
        patch = None
        if self.decoder is not None:
            targets, preds = self._local_pairs(feats)
            h, w = self.teacher.grid
            patch = self._local_map(targets, preds).reshape(x.shape[0], h, w)
        semantic = self._semantic(x, feats) if self.encoder is not None else None
        embedding = feats.cls if feats.cls is not None else feats.layers[-1].mean(dim=1)
        return RawScores(patch, semantic, embedding.float())
