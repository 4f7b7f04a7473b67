import torch

from plantad.models.decoder_student import LinearAttention
from plantad.models.dual import LossTerms, RawScores
from plantad.training.loop import build_model


def test_dual_model_shapes(tiny):
    model = build_model(tiny)
    x = torch.randn(3, 3, 56, 56)
    feats = model.teacher(x)
    preds = model.decoder(feats.layers, feats.prefix)
    assert [p.shape for p in preds] == [(3, 49, 64), (3, 49, 64)]  # one per group, prefix dropped
    enc = model.encoder(x)
    assert enc.cls.shape == (3, 64) and enc.patch_mean.shape == (3, 64)
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
