"""The last block for the class token alone (models/class_token.py) gives the whole block's class token
and the same gradients, in the teacher, both forms of S_E and the exported graph; a block whose maths
it does not reproduce runs whole, and `model.encoder.distill_patch_mean` keeps the whole block."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block

from plantad.models.class_token import class_token_block, final_class_token, supports_class_token_only
from plantad.models.exported import openvino_model
from plantad.models.factory import build_model
from tiny import tiny_settings

LOCAL_TAPS = ("model.teacher.layers=[0,1]", "model.teacher.groups=[[0],[1]]")  # the last 2 blocks untapped


def test_class_token_block_equals_the_whole_blocks_class_token_and_gradients():
    torch.manual_seed(0)
    block = Block(64, 4, qkv_bias=True, init_values=0.5)
    x = torch.randn(3, 17, 64, requires_grad=True)
    whole = block(x)[:, :1]
    fast = class_token_block(block, x)
    assert fast.shape == (3, 1, 64)
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=1e-5)
    grads_whole = torch.autograd.grad(whole.square().sum(), [x, *block.parameters()])
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, *block.parameters()])
    for a, b in zip(grads_fast, grads_whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_block_it_cannot_reproduce_runs_whole():
    torch.manual_seed(0)
    gated = Block(64, 4)
    gated.attn = Attention(64, num_heads=4, gated=True)  # a sigmoid gate on the attention output
    assert not supports_class_token_only(gated)
    assert supports_class_token_only(Block(64, 4))
    blocks, norm = torch.nn.Sequential(Block(64, 4), gated), torch.nn.LayerNorm(64)
    x = torch.randn(2, 9, 64)
    calls = []
    gated.register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(final_class_token(blocks, norm, x), norm(blocks(x))[:, 0], atol=0, rtol=0)
    assert len(calls) == 2  # the gated block ran whole both times


def _reference_semantic(model, x):
    """The semantic branch with every block run whole: the teacher's and S_E's full outputs."""
    model.teacher.class_token_only, model.encoder.patch_mean = False, True
    try:
        return model.teacher(x).cls, model.encoder(x if model.cfg.encoder.shared_blocks == 0
                                                   else model.teacher(x).shared).cls
    finally:
        model.teacher.class_token_only, model.encoder.patch_mean = True, False


@pytest.mark.parametrize("shared", [0, 1])
def test_teacher_and_encoder_class_tokens_match_the_whole_forward(shared):
    torch.manual_seed(0)
    model = build_model(tiny_settings(*LOCAL_TAPS, f"model.encoder.shared_blocks={shared}")).eval()
    assert model.teacher.class_token_only and model.encoder.patch_mean is False
    last = model.teacher.vit.blocks[-1]
    calls = []
    last.register_forward_hook(lambda *_: calls.append("whole"))
    last.norm1.register_forward_hook(lambda *_: calls.append("norm1"))
    x = torch.randn(4, 3, 56, 56)
    feats = model.teacher(x)
    assert calls == ["norm1"] and feats.patch_mean is None  # the last block ran, for the class token only
    out = model.encoder(x if shared == 0 else feats.shared)
    assert out.patch_mean is None
    want_teacher, want_encoder = _reference_semantic(model, x)
    torch.testing.assert_close(feats.cls, want_teacher, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls, want_encoder, atol=1e-5, rtol=1e-5)


def test_training_gradients_match_the_whole_forward():
    torch.manual_seed(0)
    model = build_model(tiny_settings(*LOCAL_TAPS)).train()
    x = torch.randn(4, 3, 56, 56)
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    fast = torch.autograd.grad(model(x).semantic, params)
    model.teacher.class_token_only, model.encoder.patch_mean = False, True
    whole = torch.autograd.grad(model(x).semantic, params)
    unused = [i for i, (a, b) in enumerate(zip(fast, whole)) if a.abs().sum() == 0 and b.abs().sum() == 0]
    assert len(unused) < len(params) // 4  # the comparison covers the encoder, not a few stray tensors
    for a, b in zip(fast, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_distilling_the_mean_patch_token_keeps_the_whole_last_block():
    model = build_model(tiny_settings(*LOCAL_TAPS, "model.encoder.distill_patch_mean=true")).eval()
    assert not model.teacher.class_token_only
    x = torch.randn(2, 3, 56, 56)
    assert model.teacher(x).patch_mean is not None and model.encoder(x).patch_mean is not None


def test_the_exported_graph_of_the_class_token_path_reproduces_torch(tmp_path):
    """openvino_model refuses (ExportError) a graph whose outputs differ from torch's beyond tolerance."""
    settings = tiny_settings(*LOCAL_TAPS)
    torch.manual_seed(0)
    model = build_model(settings).eval()
    assert model.teacher.class_token_only
    graph = openvino_model(model, settings.scoring, None, tmp_path)
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        got, want = graph(x), model(x)
    torch.testing.assert_close(got.semantic, want.semantic, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("shared", [0, 2])
def test_an_images_semantic_distance_does_not_depend_on_its_batch(shared):
    """Bulk scoring, serving and evaluation batch the same image differently; its score must not move.
    A plain matrix product over the batch's class tokens moved it by about 1e-7 here at 8 images."""
    torch.manual_seed(0)
    model = build_model(tiny_settings(*LOCAL_TAPS, f"model.encoder.shared_blocks={shared}")).eval()
    assert model.teacher.class_token_only
    x = torch.randn(20, 3, 56, 56)
    with torch.no_grad():
        whole_batch = model(x).semantic
        for n in (1, 2, 3, 8, 13):
            assert torch.equal(model(x[:n]).semantic, whole_batch[:n]), n
