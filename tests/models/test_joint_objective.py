"""The Noisy-OR training objective does not couple the students: they train independently.

The README says so; these tests hold it to that. Same seed, same data, same model structure: the
semantic weight of -log(1 - P) = w_D L_D + w_E L_E has no effect on S_D's parameters.
"""

from __future__ import annotations

import torch

from plantad.training.loop import build_model, build_optimizer, train_step
from tiny import tiny_settings


def _train(weight_semantic: float, steps: int = 4) -> torch.nn.Module:
    settings = tiny_settings("model.encoder.depth=2", "model.noisy_or.weighting=fixed",
                             f"model.noisy_or.weight_semantic={weight_semantic}")
    torch.manual_seed(0)
    model = build_model(settings, load_teacher_weights=False)
    opt, sched = build_optimizer(model, settings.train)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        images = torch.randn(4, 3, 56, 56, generator=gen)
        train_step(model, images, opt, sched, step, settings.train)
    return model


def test_semantic_weight_leaves_the_local_student_unchanged() -> None:
    a, b = _train(1.0), _train(50.0)
    for (name, pa), pb in zip(a.decoder.named_parameters(), b.decoder.parameters()):
        assert torch.equal(pa, pb), f"S_D parameter {name} depends on the semantic loss weight"
    moved = [not torch.equal(pa, pb) for pa, pb in zip(a.encoder.parameters(), _untrained_encoder().parameters())]
    assert any(moved), "S_E did not train at all"


def _untrained_encoder() -> torch.nn.Module:
    settings = tiny_settings("model.encoder.depth=2")
    torch.manual_seed(0)
    return build_model(settings, load_teacher_weights=False).encoder


def test_local_gradient_comes_from_the_local_loss_only() -> None:
    settings = tiny_settings("model.encoder.depth=2", "model.noisy_or.weighting=fixed")
    torch.manual_seed(0)
    model = build_model(settings, load_teacher_weights=False).train()
    x = torch.randn(2, 3, 56, 56)
    torch.manual_seed(2)
    terms = model(x)
    terms.semantic.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.decoder.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.encoder.parameters())
