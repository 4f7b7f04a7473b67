"""The speed levers of the dual model score like the reference path, within stated tolerances.

- One teacher forward serves both students, and the teacher stops at the deepest block anything
  needs: scores are bit-identical to running all of its blocks.
- S_D's input is built without copying every layer back together: bit-identical values.
- The map's upsampling and blur run as two small matrix products (`smooth_map`): equal to blurring
  the upsampled map within 1e-5 of the map's maximum.
- bf16 autocast on CPU (`scoring.cpu_amp`): on the demo data, probabilities within 0.01 of float32,
  maps within 1% of the map's maximum, the same decision for every image whose float32 probability
  is more than 0.01 from the threshold.
- The lighter S_E (`model.encoder.shared_blocks`) is a different model, not an approximation: it
  reads the teacher's tokens, trains only its own blocks and saves and loads like any other.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from plantad.evaluation.evaluate import predict
from plantad.evaluation.evaluate import test_rows as split_test_rows
from plantad.models.checkpoint import META_FILE, MODEL_FILE, SHA256_KEY, load_model, save_model
from plantad.models.factory import build_model
from plantad.models.safe_load import file_sha256
from plantad.scoring import ScoreOutput, gaussian_blur, score_batch, smooth_map, top_k_mean, upsample
from plantad.training.loop import build_optimizer, train_step
from tiny import tiny_settings

P_TOL = 0.01  # probability, absolute
MAP_TOL = 0.01  # fraction of the map's maximum


def count_calls(modules: list[torch.nn.Module]) -> list[int]:
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("shared", [0, 2])
def test_one_teacher_forward_serves_both_students(shared):
    model = build_model(tiny_settings(f"model.encoder.shared_blocks={shared}"))
    vit = model.teacher.vit
    counts = count_calls([vit.patch_embed, *vit.blocks, vit.norm])
    x = torch.randn(2, 3, 56, 56)
    model.eval()(x)
    assert counts == [1] * len(counts)
    model.train()(x)
    assert counts == [2] * len(counts)


def test_local_only_teacher_stops_at_the_deepest_layer_with_identical_scores():
    settings = tiny_settings("model.branches=local", "model.teacher.layers=[0,1]", "model.teacher.groups=[[0],[1]]")
    torch.manual_seed(0)
    model = build_model(settings).eval()
    model.noisy_or.threshold.fill_(0.5)
    vit = model.teacher.vit
    counts = count_calls([*vit.blocks, vit.norm])
    x = torch.randn(3, 3, 56, 56)
    fast = score_batch(model, x, settings.scoring)
    assert counts == [1, 1, 0, 0, 0] and model.teacher.blocks_run == 2
    model.teacher.final = True  # the reference path: every block and the final norm
    ref = score_batch(model, x, settings.scoring)
    assert counts == [2, 2, 1, 1, 1]
    # every score is identical; the line-health embedding is not a score: the full path gives the class
    # token, the early stop the deepest layer's mean patch token (calibration and serving both stop early)
    for name in ScoreOutput._fields:
        a, b = getattr(fast, name), getattr(ref, name)
        if name == "embedding":
            assert a is not None and b is not None and a.shape[0] == b.shape[0] == 3
            continue
        assert (a is None and b is None) or torch.equal(a, b), name


def test_decoder_input_equals_the_mean_of_the_full_token_tensors():
    model = build_model(tiny_settings()).eval()
    feats = model.teacher(torch.randn(2, 3, 56, 56))
    captured = []
    model.decoder.bottleneck.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    model.decoder(feats.layers, feats.prefix)
    reference = torch.stack([torch.cat([c, p], dim=1) for p, c in zip(feats.layers, feats.prefix)]).mean(dim=0)
    assert torch.equal(captured[0], reference)


@pytest.mark.parametrize("h, w, size, sigma", [(28, 28, 392, 4.0), (7, 7, 56, 1.0), (3, 3, 16, 4.0), (5, 7, 40, 2.0),
                                                (6, 6, 48, 0.0)])
def test_smoothing_as_matrix_products_equals_upsample_then_blur(h, w, size, sigma):
    """Covers reflect padding, replicate padding (map side <= kernel radius), non-square and no blur."""
    patch = torch.rand(4, h, w)
    reference = gaussian_blur(upsample(patch, size), sigma)
    fast = smooth_map(patch, size, sigma)
    assert fast.shape == reference.shape == (4, size, size)
    assert (fast - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert torch.allclose(top_k_mean(fast, 0.01), top_k_mean(reference, 0.01), rtol=1e-5, atol=0)


def test_cpu_bf16_scores_match_float32_on_the_demo_data(trained_tiny, demo_root, demo_manifest):
    settings, result = trained_tiny
    model, _ = load_model(result.model_path)
    rows = split_test_rows(demo_manifest)
    ref = predict(model, rows, demo_root, settings, progress=False)
    bf16 = predict(model, rows, demo_root, settings.model_copy(update={
        "scoring": settings.scoring.model_copy(update={"cpu_amp": True})}), progress=False)
    assert np.abs(bf16.probability - ref.probability).max() <= P_TOL
    assert np.abs(bf16.maps - ref.maps).max() <= MAP_TOL * ref.maps.max()
    assert not np.array_equal(bf16.maps, ref.maps)  # bf16 did run
    clear = np.abs(ref.probability - float(model.noisy_or.threshold)) > P_TOL
    assert clear.sum() >= 0.9 * len(rows)
    assert np.array_equal(bf16.is_anomalous[clear], ref.is_anomalous[clear])


def test_shared_encoder_reads_the_teacher_tokens_and_trains_only_its_blocks():
    settings = tiny_settings("model.encoder.shared_blocks=3")
    torch.manual_seed(0)
    model = build_model(settings)
    assert len(model.encoder.blocks) == 1 and not hasattr(model.encoder, "vit")  # 4 teacher blocks - 3
    x = torch.randn(2, 3, 56, 56)
    feats = model.teacher(x)
    _, inter = model.teacher.vit.forward_intermediates(x, indices=[2], return_prefix_tokens=True, output_fmt="NLC")
    assert torch.equal(feats.shared, torch.cat([inter[0][1], inter[0][0]], dim=1))
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    encoder_before = [p.clone() for p in model.encoder.parameters()]
    opt, sched = build_optimizer(model, settings.train)
    train_step(model, x, opt, sched, 0, settings.train)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, model.teacher.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(encoder_before, model.encoder.parameters()) if a.ndim == 2)


def test_shared_blocks_must_leave_the_student_a_block():
    with pytest.raises(ValueError, match=r"model.encoder.shared_blocks=4 must be below the teacher's depth \(4"):
        build_model(tiny_settings("model.encoder.shared_blocks=4"))


def test_shared_encoder_model_saves_and_loads_with_identical_scores(tmp_path):
    settings = tiny_settings("model.encoder.shared_blocks=2")
    model = build_model(settings).eval()
    model.noisy_or.threshold.fill_(0.5)
    save_model(model, settings, tmp_path / "m")
    loaded, meta = load_model(tmp_path / "m")
    assert "first 2 blocks" in meta["model"]["semantic_student"]
    x = torch.randn(2, 3, 56, 56)
    for a, b in zip(score_batch(model, x, settings.scoring), score_batch(loaded, x, settings.scoring)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_a_model_saved_before_the_speed_options_still_loads(tmp_path):
    """Its settings lack shared_blocks and cpu_amp: it loads as the paper's S_E in float32."""
    settings = tiny_settings()
    model = build_model(settings).eval()
    model.noisy_or.threshold.fill_(0.5)
    out = tmp_path / "old"
    save_model(model, settings, out)
    blob = torch.load(out / MODEL_FILE, weights_only=True)
    saved = blob["meta"]["settings"]
    del saved["model"]["encoder"]["shared_blocks"], saved["train"]["cpu_amp"], saved["scoring"]["cpu_amp"]
    torch.save(blob, out / MODEL_FILE)
    meta = json.loads((out / META_FILE).read_text())
    meta[SHA256_KEY] = file_sha256(out / MODEL_FILE)
    (out / META_FILE).write_text(json.dumps(meta))
    loaded, _ = load_model(out)
    assert loaded.encoder.vit is not None and not loaded.teacher.share_blocks
    x = torch.randn(2, 3, 56, 56)
    assert torch.equal(score_batch(model, x, settings.scoring).probability,
                       score_batch(loaded, x, settings.scoring).probability)
