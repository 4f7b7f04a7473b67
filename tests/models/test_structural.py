"""SNL's four structural losses, its test-time map and CRAM, on hand-sized tensors."""

import math

import pytest
import torch

from plantad.config import SNLConfig
from plantad.models.structural import (
    CRAM,
    channel_loss,
    inter_affinity_loss,
    intra_affinity_distance,
    intra_affinity_loss,
    spatial_loss,
    structural_loss,
    structural_map,
)

LOSSES = {
    "channel": channel_loss,
    "spatial": lambda t, s: spatial_loss(t, s, 1.0),
    "intra": intra_affinity_loss,
    "inter": inter_affinity_loss,
}

# one image, two positions, two channels: position 1 of the student points elsewhere
T1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
S1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_is_zero_for_identical_features_and_positive_otherwise(name):
    loss = LOSSES[name]
    torch.manual_seed(0)
    t = torch.randn(3, 16, 8)
    assert abs(float(loss(t, t.clone()))) < 1e-6
    s = t.clone()
    s[:, 3] = torch.randn(3, 8)  # one position of each image replaced
    s[1] = s[1] * torch.linspace(0.5, 2.0, 8)  # and one image's channels rescaled (moves its pooled direction)
    assert float(loss(t, s)) > 1e-4


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_leaves_the_teacher_without_gradients(name):
    t = torch.randn(2, 9, 4, requires_grad=True)
    s = torch.randn(2, 9, 4, requires_grad=True)
    LOSSES[name](t, s).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_channel_and_intra_losses_match_hand_computed_values():
    # channel: position 0 cos 1 -> 0, position 1 cos 0 -> 1; mean 0.5
    assert float(channel_loss(T1, S1)) == pytest.approx(0.5)
    # affinities: teacher [[1,0],[0,1]], student [[1,1],[1,1]]: squared difference mean 2/4
    assert float(intra_affinity_loss(T1, S1)) == pytest.approx(0.5)
    # test-time map: per position mean |A_T - A_S| over its row = 0.5; plus the channel distance
    assert torch.allclose(intra_affinity_distance(T1, S1), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(structural_map(T1, S1, 1.0), torch.tensor([[0.5, 1.5]]))
    assert torch.allclose(structural_map(T1, S1, 0.0), torch.tensor([[0.0, 1.0]]))


def test_spatial_loss_matches_hand_computed_kl():
    # channel 0: teacher softmax over positions of [1, 0] = [p, 1-p], student softmax of [1, 1] = [1/2, 1/2];
    # channel 1 is the mirror image, so both channels give the same KL
    p = math.e / (math.e + 1.0)
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert float(spatial_loss(T1, S1, 1.0)) == pytest.approx(kl, rel=1e-5)
    # at temperature 2: logits halved, KL times T^2 = 4
    q = math.exp(0.5) / (math.exp(0.5) + 1.0)
    kl2 = q * math.log(q / 0.5) + (1 - q) * math.log((1 - q) / 0.5)
    assert float(spatial_loss(T1, S1, 2.0)) == pytest.approx(4 * kl2, rel=1e-5)


def test_inter_affinity_matches_hand_computed_value():
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # pooled: e1, e2 -> cos 0
    s = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])  # pooled: e1, (1,1) -> cos 1/sqrt2
    # B x B difference: off-diagonal 1/sqrt2 each, squared 1/2, mean over 4 entries = 1/4
    assert float(inter_affinity_loss(t, s)) == pytest.approx(0.25)


def test_structural_loss_is_the_weighted_sum_and_a_zero_weight_drops_a_term():
    cfg = SNLConfig(weight_channel=2.0, weight_spatial=0.0, weight_intra=3.0, weight_inter=0.5)
    expected = 2.0 * 0.5 + 3.0 * 0.5 + 0.5 * 0.0  # inter is 0 for a single image
    assert float(structural_loss(T1, S1, cfg)) == pytest.approx(expected)
    only_spatial = SNLConfig(weight_channel=0.0, weight_spatial=1.0, weight_intra=0.0, weight_inter=0.0)
    assert float(structural_loss(T1, S1, only_spatial)) == pytest.approx(float(spatial_loss(T1, S1, 1.0)))


def test_cram_with_zero_residual_weight_is_the_identity():
    torch.manual_seed(0)
    cram = CRAM(dim=8, num_centers=3, residual_weight=0.0)
    torch.nn.init.normal_(cram.proj.weight)  # a trained projection: still the identity at weight 0
    x = torch.randn(2, 5, 8)
    assert torch.equal(cram(x), x)
    fresh = CRAM(dim=8, num_centers=3)  # zero-initialised projection: identity until trained
    assert torch.equal(fresh(x), x)


def test_cram_adds_the_projected_soft_assigned_residuals():
    torch.manual_seed(0)
    cram = CRAM(dim=8, num_centers=3, residual_weight=0.5)
    with torch.no_grad():
        cram.proj.weight.copy_(torch.eye(8))
    x = torch.randn(2, 5, 8)
    a = cram.assign(x).softmax(-1)  # (B, N, K)
    residual = (a.unsqueeze(-1) * (x.unsqueeze(2) - cram.centers)).sum(2)  # sum_k a_k (x - c_k)
    assert torch.allclose(cram(x), x + 0.5 * residual, atol=1e-6)
    maps = x.transpose(1, 2).reshape(2, 8, 5, 1)  # the same features as a (B, C, H, W) map
    assert torch.allclose(cram(maps).flatten(2).transpose(1, 2), cram(x), atol=1e-6)
