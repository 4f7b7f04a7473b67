"""S_E on a downscaled view (`model.encoder.image_size`): S_E sees the image at a smaller size, its
target stays the teacher's class token from the full-size pass, and the exported graph scores it
like torch.

- `Downscale` equals torch's antialiased bilinear resize (and is not the plain bilinear one).
- Only S_E sees the view: the teacher and S_D run at the model's input size, S_E's ViT has the
  view's token grid, and training moves S_E towards the full-size class token.
- The OpenVINO graph of such a model scores within the same tolerance as the model without it.
- Bad sizes are refused with a message naming the setting.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plantad.config import ConfigError
from plantad.models.checkpoint import load_model, save_model
from plantad.models.encoder_student import Downscale
from plantad.models.exported import OpenVinoModel, openvino_model
from plantad.models.factory import build_model
from plantad.scoring import score_batch
from plantad.training.loop import build_optimizer, train_step
from tiny import tiny_settings


@pytest.mark.parametrize("size_in,size_out", [(56, 32), (392, 224), (96, 56)])
def test_downscale_is_torchs_antialiased_bilinear_resize(size_in, size_out):
    x = torch.randn(2, 3, size_in, size_in, generator=torch.Generator().manual_seed(0))
    got = Downscale(size_in, size_out)(x)
    want = F.interpolate(x, size=(size_out, size_out), mode="bilinear", antialias=True, align_corners=False)
    plain = F.interpolate(x, size=(size_out, size_out), mode="bilinear", align_corners=False)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-5
    assert float((got - plain).abs().max()) > 0.1  # the low-pass is there: not the aliasing resize


def test_only_the_semantic_student_sees_the_view_and_it_learns_the_full_size_target():
    settings = tiny_settings("model.encoder.image_size=32", "model.encoder.depth=2")
    torch.manual_seed(0)
    model = build_model(settings)
    assert model.encoder.view_size == 32 and tuple(model.encoder.vit.patch_embed.grid_size) == (4, 4)
    assert model.teacher.grid == (7, 7)
    seen: list[tuple[int, ...]] = []
    model.encoder.vit.patch_embed.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    x = torch.randn(8, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        before = model(x).semantic.mean()
        target = model.teacher(x).cls  # the full-size pass's class token
    assert seen == [(8, 3, 32, 32)]
    assert target.shape == (8, model.teacher.embed_dim)
    opt, sched = build_optimizer(model, settings.train)
    model.train()
    for step in range(15):
        train_step(model, x, opt, sched, step, settings.train)
    with torch.no_grad():
        after = model.eval()(x).semantic.mean()
    assert float(after) < 0.8 * float(before), (float(before), float(after))
    assert "downscaled to 32 px" in model.describe()["semantic_student"]


def test_a_model_with_the_view_saves_loads_and_exports_with_the_same_scores(tmp_path):
    settings = tiny_settings("model.encoder.image_size=32")
    torch.manual_seed(0)
    model = build_model(settings).eval()
    model.noisy_or.threshold.fill_(0.5)
    save_model(model, settings, tmp_path / "m")
    loaded, meta = load_model(tmp_path / "m")
    assert loaded.encoder.view_size == 32 and "downscaled to 32 px" in meta["model"]["semantic_student"]
    x = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    cfg = settings.scoring.model_copy(update={"runtime": "openvino", "cpu_amp": False})
    ref = score_batch(model, x, cfg)
    assert torch.equal(score_batch(loaded, x, cfg).probability, ref.probability)
    graph = openvino_model(loaded, cfg, None, tmp_path / "cache")  # raises when it cannot reproduce torch
    assert isinstance(graph, OpenVinoModel)
    got = score_batch(graph, x, cfg)
    assert float((got.semantic_score - ref.semantic_score).abs().max()) <= 1e-3 * float(ref.semantic_score.abs().max())


@pytest.mark.parametrize("extra,message", [
    (["model.encoder.image_size=36"], r"model.encoder.image_size=36 must be a multiple of the teacher's patch size \(8\)"),
    (["model.encoder.image_size=64"], r"at most the model's input size \(data.image_size 56\)"),
])
def test_a_view_the_student_cannot_use_is_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_settings(*extra))


def test_a_view_with_the_shared_encoder_is_refused():
    with pytest.raises(ConfigError, match=r"model.encoder.image_size=32 needs model.encoder.shared_blocks=0"):
        tiny_settings("model.encoder.image_size=32", "model.encoder.shared_blocks=2")
