import torch

from plantad.models.decoder_student import LinearAttention
from plantad.models.dual import LossTerms, RawScores
from plantad.models.factory import build_model


def test_dual_model_shapes(tiny):
    model = build_model(tiny)
    x = torch.randn(3, 3, 56, 56)
    feats = model.teacher(x)
    preds = model.decoder(feats.layers, feats.prefix)
    assert [p.shape for p in preds] == [(3, 49, 64), (3, 49, 64)]  # one per group, prefix dropped
    enc = model.encoder(x)
    assert enc.cls.shape == (3, 64) and enc.patch_mean is None  # only the class token is distilled by default
    model.eval()
    raw = model(x)
    assert isinstance(raw, RawScores)
    assert raw.patch_distance.shape == (3, 7, 7) and raw.semantic.shape == (3,)
    model.train()
    terms = model(x)
    assert isinstance(terms, LossTerms) and terms.total.ndim == 0


def test_students_are_trainable_and_teacher_frozen(tiny):
    model = build_model(tiny)
    groups = model.student_parameter_groups()
    assert set(groups) == {"local", "semantic"}
    trainable = {id(p) for ps in groups.values() for p in ps}
    assert all(id(p) not in trainable for p in model.teacher.parameters())
    model.train()
    assert not model.teacher.vit.training  # stays in eval mode


def test_single_branch_models_build_only_their_student(tiny):
    local = build_model(tiny.model_copy(update={"model": tiny.model.model_copy(update={"branches": "local"})}))
    assert local.encoder is None and local.decoder is not None
    sem = build_model(tiny.model_copy(update={"model": tiny.model.model_copy(update={"branches": "semantic"})}))
    assert sem.decoder is None and sem.encoder is not None


def test_linear_attention_is_an_average_of_values():
    """Weights q.k / sum(q.k) are positive and sum to one: identical values come back unchanged."""
    attn = LinearAttention(dim=8, num_heads=2)
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(8))
        attn.proj.bias.zero_()
    x = torch.randn(2, 5, 8)
    v = attn.qkv(x)[..., 16:]
    same = torch.randn(1, 1, 8).expand(2, 5, 8)
    with torch.no_grad():
        attn.qkv.bias[16:] = same[0, 0]
        attn.qkv.weight[16:] = 0.0
    out = attn(x)
    assert torch.allclose(out, same, atol=1e-5)
    assert v.shape == (2, 5, 8)


def test_register_token_teachers_drop_every_prefix_token():
    """The reg4 DINOv2 variants carry 1 class + 4 register tokens; maps cover patches only."""
    from plantad.scoring import score_batch
    from tiny import tiny_settings

    settings = tiny_settings("model.teacher.name=vit_small_patch14_reg4_dinov2")
    model = build_model(settings)
    assert model.teacher.num_prefix_tokens == 5
    x = torch.randn(2, 3, 56, 56)
    feats = model.teacher(x)
    assert [p.shape[1] for p in feats.layers] == [49] * 4
    assert [p.shape for p in model.decoder(feats.layers, feats.prefix)] == [(2, 49, 64)] * 2
    model.train()
    assert torch.isfinite(model(x).total)
    model.eval()
    model.noisy_or.threshold.fill_(0.5)
    scores = score_batch(model, x, settings.scoring)
    assert scores.anomaly_map.shape == (2, 56, 56)
