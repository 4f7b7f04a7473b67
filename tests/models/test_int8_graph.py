"""scoring.openvino_weights: int8 — the NNCF-quantized graph, calibrated on the held-out normal images
the model ships, scores like torch within scoring.int8_tolerance on normal and defective demo images;
a graph beyond the tolerance, or a model with no images to calibrate on, falls back to the fp16 graph."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from plantad.config import ConfigError
from plantad.evaluation.metrics import image_auroc
from plantad.models.checkpoint import META_FILE, load_model, recorded_sha256
from plantad.models.exported import NORMAL_SAMPLE_IMAGES, for_scoring
from plantad.scoring import score_batch
from plantad.training.trainer import image_loader


def int8(settings, **update):
    return settings.scoring.model_copy(update={"runtime": "openvino", "cpu_amp": True, "openvino_weights": "int8",
                                               **update})


@pytest.fixture(scope="module")
def test_images(trained_tiny, demo_root, demo_manifest):
    """The demo's test split: good and defective images of every category."""
    settings, _ = trained_tiny
    rows = demo_manifest[demo_manifest.split == "test"].reset_index(drop=True)
    batch = next(iter(image_loader(rows, demo_root, settings.model_copy(update={"scoring": settings.scoring.model_copy(
        update={"batch_size": len(rows)})}), shuffle=False)))
    return batch["image"], batch["label"]


def test_the_int8_graph_scores_like_torch_within_its_tolerance(tiny_model, test_images, graph_cache):
    settings, model, sha = tiny_model
    # at most 16 of the held-out normal images (this tiny run holds out 12) ship with the model
    assert model.normal_sample.dtype == torch.uint8 and 2 <= len(model.normal_sample) <= NORMAL_SAMPLE_IMAGES
    cfg = int8(settings)
    graph = for_scoring(model, cfg, sha, graph_cache)
    assert graph.runtime == "openvino int8+bf16"
    entries = [p.name for p in graph_cache.iterdir() if p.is_dir()]  # cached apart from the fp16 graph
    assert any(e.startswith(f"{sha}-{model.image_size}px-int8-g") for e in entries), entries
    images, labels = test_images
    ref, got = score_batch(model, images, cfg), score_batch(graph, images, cfg)
    gap = float((got.probability - ref.probability).abs().max())
    aurocs = [image_auroc(labels.numpy(), out.probability.numpy()) for out in (got, ref)]
    print(f"int8 against torch bf16 on {len(labels)} demo test images: gap {gap:.4f}, AUROC {aurocs}")
    assert gap <= cfg.int8_tolerance, gap
    assert abs(aurocs[0] - aurocs[1]) <= 0.02, aurocs
    clear = (ref.probability - float(model.noisy_or.threshold)).abs() > cfg.int8_tolerance
    assert torch.equal(got.is_anomalous[clear], ref.is_anomalous[clear])


def test_an_int8_graph_beyond_the_tolerance_falls_back_to_the_fp16_graph(tiny_model, test_images, graph_cache,
                                                                         caplog):
    settings, model, sha = tiny_model
    with caplog.at_level(logging.WARNING, logger="plantad.models.exported"):
        graph = for_scoring(model, int8(settings, int8_tolerance=0.0), sha, graph_cache)
    assert graph.runtime == "openvino bf16"
    assert "scoring.int8_tolerance=0" in caplog.text and "scoring with the fp16 graph instead" in caplog.text
    images, _ = test_images
    ref = score_batch(model, images, settings.scoring.model_copy(update={"cpu_amp": True}))
    assert float((score_batch(graph, images, int8(settings)).probability - ref.probability).abs().max()) <= 0.01


def test_a_model_without_normal_images_falls_back_to_the_fp16_graph(trained_tiny, graph_cache, caplog):
    settings, result = trained_tiny
    model, _ = load_model(result.model_path)
    model.normal_sample = None  # as a model saved before the images were kept
    sha = recorded_sha256(result.model_path.parent / META_FILE)
    with caplog.at_level(logging.WARNING, logger="plantad.models.exported"):
        graph = for_scoring(model, int8(settings), sha, graph_cache)
    assert graph.runtime == "openvino bf16"
    assert "ships no held-out normal images" in caplog.text


@pytest.mark.parametrize("setting", ["scoring.openvino_weights=int4", "scoring.int8_tolerance=-0.1"])
def test_bad_weight_settings_are_refused(setting):
    from tiny import tiny_settings

    with pytest.raises(ConfigError, match=setting.split("=")[0].split(".")[-1]):
        tiny_settings(setting)


@pytest.mark.parametrize("importer", ["from plantad.models.exported import import_nncf; import_nncf()", "import nncf"],
                         ids=["plantad", "plain"])
def test_importing_nncf_through_plantad_sends_no_telemetry(importer):
    """Imported plainly, NNCF sends to Google Analytics through openvino_telemetry; through plantad not."""
    code = (f"import sys; {importer}; from nncf.telemetry import wrapper; "
            "print(isinstance(wrapper.telemetry, wrapper.NNCFTelemetry), 'openvino_telemetry' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == (["False", "False"] if importer.startswith("from") else ["True", "True"]), out.stderr
