import torch

from plantad.models.snl import CRAM, channel_distance, inter_affinity_loss, intra_affinity_distance, spatial_kl
from plantad.scoring import score_batch
from plantad.training.calibration import calibrate
from plantad.training.loop import build_model, build_optimizer, train_step

from tiny import tiny_settings


def test_cram_starts_as_identity_and_aggregates_residuals():
    cram = CRAM(dim=8, num_centers=3)
    x = torch.randn(2, 5, 8)
    assert torch.equal(cram(x), x)
    with torch.no_grad():
        cram.proj.weight.copy_(torch.eye(8))
    a = cram.assign(x).softmax(-1)
    expected = x + (a.unsqueeze(-1) * (x.unsqueeze(2) - cram.centers)).sum(2)
    assert torch.allclose(cram(x), expected, atol=1e-6)


def test_structural_distances_vanish_only_for_identical_features():
    t = torch.randn(2, 16, 8)
    assert channel_distance(t, t).abs().max() < 1e-6
    assert intra_affinity_distance(t, t).abs().max() < 1e-6
    assert spatial_kl(t, t, 1.0).abs() < 1e-6
    assert inter_affinity_loss(t, t).abs() < 1e-6
    s = t.clone()
    s[:, 3] = torch.randn(2, 8)  # one position of each image replaced
    d = intra_affinity_distance(t, s)
    assert (d.argmax(dim=1) == 3).all()  # the structural map points at the changed position
    assert spatial_kl(t, s, 1.0) > 0 and inter_affinity_loss(t, s) > 0


def test_snl_model_trains_and_scores(demo_root, demo_manifest):
    settings = tiny_settings("model.method=snl", "model.branches=local")
    torch.manual_seed(0)
    model = build_model(settings)
    opt, sched = build_optimizer(model, settings.train)
    from plantad.training.trainer import endless_images, image_loader, normal_train_rows

    batches = endless_images(image_loader(normal_train_rows(demo_manifest), demo_root, settings, shuffle=True))
    losses = [train_step(model, next(batches), opt, sched, s, settings.train)["loss"] for s in range(25)]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    calibrate(model, [next(batches)], settings.scoring)
    out = score_batch(model, next(batches), settings.scoring)
    assert out.anomaly_map.shape == (8, 56, 56) and out.semantic_score is None
    assert torch.all((out.probability >= 0) & (out.probability <= 1))


def test_snl_requires_the_local_branch():
    import pytest

    from plantad.config import ConfigError

    with pytest.raises(ConfigError, match="model.method=snl"):
        tiny_settings("model.method=snl")
