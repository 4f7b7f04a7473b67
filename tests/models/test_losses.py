import math

import torch

from plantad.models.losses import global_cosine_hard_mining, local_distance_map, semantic_distance
from plantad.models.noisy_or import NoisyOr, fit_lambda, noisy_or, score_to_probability
from plantad.config import NoisyOrConfig


def test_cosine_loss_is_zero_for_identical_and_positive_otherwise():
    t = [torch.randn(2, 9, 4)]
    assert float(global_cosine_hard_mining(t, [t[0].clone()], 0.0, 1.0)) < 1e-6
    assert float(global_cosine_hard_mining(t, [torch.randn(2, 9, 4)], 0.0, 1.0)) > 0.1


def test_loss_matches_paper_formula_on_two_groups():
    t = [torch.randn(3, 6, 5), torch.randn(3, 6, 5)]
    s = [torch.randn(3, 6, 5), torch.randn(3, 6, 5)]
    expected = 0.5 * sum((1 - torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))).mean() for a, b in zip(t, s))
    assert torch.allclose(global_cosine_hard_mining(t, s, 0.0, 1.0), expected)


def test_hard_mining_keeps_the_value_and_scales_easy_gradients():
    torch.manual_seed(0)
    t = [torch.randn(2, 10, 6)]
    base = torch.randn(2, 10, 6)
    s1 = base.clone().requires_grad_(True)
    s2 = base.clone().requires_grad_(True)
    l1 = global_cosine_hard_mining(t, [s1], 0.0, 1.0)
    l2 = global_cosine_hard_mining(t, [s2], 0.5, 0.1)
    assert torch.allclose(l1, l2)
    l1.backward()
    l2.backward()
    ratio = (s2.grad.norm(dim=-1) / s1.grad.norm(dim=-1)).flatten()
    assert torch.isclose(ratio, torch.tensor(0.1), atol=1e-4).sum() == 10  # half the 20 points are easy
    assert torch.isclose(ratio, torch.tensor(1.0), atol=1e-4).sum() == 10
    dist = local_distance_map(t, [base]).flatten()
    easy = torch.isclose(ratio, torch.tensor(0.1), atol=1e-4)
    assert dist[easy].max() <= dist[~easy].min()  # the easy ones are the closest points


def test_semantic_distance():
    a = torch.randn(4, 8)
    assert torch.allclose(semantic_distance(a, a), torch.zeros(4), atol=1e-6)
    assert torch.allclose(semantic_distance(a, -a), torch.full((4,), 2.0), atol=1e-6)
    assert torch.allclose(semantic_distance(a, a, a, -a), torch.ones(4), atol=1e-6)


def test_noisy_or_combines_as_specified():
    pl = torch.tensor([0.0, 0.5, 0.9, 1.0])
    ps = torch.tensor([0.0, 0.5, 0.1, 0.3])
    assert torch.allclose(noisy_or(pl, ps), 1 - (1 - pl) * (1 - ps))
    assert torch.allclose(noisy_or(pl, ps), torch.tensor([0.0, 0.75, 0.91, 1.0]))


def test_calibration_maps_the_normal_quantile_to_the_probability():
    scores = torch.linspace(0.1, 1.0, 101)
    lam = fit_lambda(scores, 0.5, 0.5)
    q = float(torch.quantile(scores, 0.5))
    assert math.isclose(float(score_to_probability(torch.tensor(q), torch.tensor(lam))), 0.5, rel_tol=1e-5)


def test_noisy_or_module_objective_is_the_weighted_sum():
    """-log(1 - P) = lambda_D s_D + lambda_E s_E: the identity behind the training objective."""
    m = NoisyOr(NoisyOrConfig())
    m.lambda_local.fill_(2.0)
    m.lambda_semantic.fill_(30.0)
    s_d, s_e = torch.tensor([0.1, 0.4]), torch.tensor([0.01, 0.002])
    p_d, p_e, p = m.probabilities(s_d, s_e)
    assert torch.allclose(-torch.log1p(-p), 2.0 * s_d + 30.0 * s_e, atol=1e-5)
    assert torch.allclose(p, 1 - (1 - p_d) * (1 - p_e))


def test_adaptive_weights_follow_the_inverse_running_loss():
    m = NoisyOr(NoisyOrConfig(weighting="adaptive", ema_momentum=0.0))
    w_d, w_e = m.training_weights(torch.tensor(0.5), torch.tensor(0.01))
    assert math.isclose(w_d, 2.0, rel_tol=1e-6) and math.isclose(w_e, 100.0, rel_tol=1e-6)
    fixed = NoisyOr(NoisyOrConfig(weighting="fixed", weight_local=1.0, weight_semantic=3.0))
    assert fixed.training_weights(torch.tensor(0.5), torch.tensor(0.01)) == (1.0, 3.0)
