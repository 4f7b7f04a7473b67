"""scoring.runtime: openvino — the exported graph scores like the torch model, is cached per model
file, heals a damaged cache entry, and never makes scoring fail (torch takes over, with a warning)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from plantad.models.checkpoint import META_FILE, load_model, recorded_sha256, save_model
from plantad.models.exported import OpenVinoModel, for_scoring
from plantad.scoring import score_batch
from plantad.serving.predictor import Predictor
from plantad.training.trainer import image_loader


# bf16 on both sides: the graph and torch's autocast round differently; probabilities stay within
# this of each other on the demo data; float32 within 1e-3 (measured 1.4e-4: the kernels differ)
PROB_TOL = {False: 1e-3, True: 0.01}


def with_runtime(settings, runtime: str):
    return settings.model_copy(update={"scoring": settings.scoring.model_copy(update={"runtime": runtime})})


@pytest.fixture(scope="module")
def demo_batch(trained_tiny, demo_root, demo_manifest):
    settings, _ = trained_tiny
    return next(iter(image_loader(demo_manifest.head(16), demo_root, settings, shuffle=False)))["image"]


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_openvino_graph_scores_like_torch_on_the_demo_data(tiny_model, demo_batch, graph_cache, bf16):
    settings, model, sha = tiny_model
    cfg = settings.scoring.model_copy(update={"runtime": "openvino", "cpu_amp": bf16})
    graph = for_scoring(model, cfg, sha, graph_cache)
    assert isinstance(graph, OpenVinoModel) and graph.runtime.startswith("openvino")
    ref, got = score_batch(model, demo_batch, cfg), score_batch(graph, demo_batch, cfg)
    gap = float((got.probability - ref.probability).abs().max())
    assert gap <= PROB_TOL[bf16], gap
    assert got.anomaly_map.shape == ref.anomaly_map.shape
    map_gap = float((got.anomaly_map - ref.anomaly_map).abs().max() / ref.anomaly_map.abs().max())
    assert map_gap <= (0.05 if bf16 else 1e-3), map_gap
    thr = float(model.noisy_or.threshold)
    clear = (ref.probability - thr).abs() > PROB_TOL[bf16]  # images not on the threshold itself
    assert torch.equal(got.is_anomalous[clear], ref.is_anomalous[clear])
    for name in ("local_score", "semantic_score", "p_local", "p_semantic"):
        assert (getattr(got, name) is None) == (getattr(ref, name) is None), name
    # a batch size the export never saw
    one = score_batch(graph, demo_batch[:3], cfg)
    assert float((one.probability - ref.probability[:3]).abs().max()) <= PROB_TOL[bf16]


class CountingCompiled:
    """The compiled graph, counting the infer requests made from it (each holds its own buffers)."""

    def __init__(self, compiled) -> None:
        self.compiled, self.made, self.lock = compiled, 0, threading.Lock()

    def create_infer_request(self):
        with self.lock:
            self.made += 1
        return self.compiled.create_infer_request()


def test_the_graph_reuses_its_infer_requests_and_scores_from_threads(tiny_model, demo_batch, graph_cache):
    """A fresh request per call re-faults its activation memory every batch (seconds per batch
    under Serve at 392 px); requests are kept, one per concurrent caller, and stay correct."""
    settings, model, sha = tiny_model
    cfg = settings.scoring.model_copy(update={"runtime": "openvino"})
    graph = for_scoring(model, cfg, sha, graph_cache)
    counting = graph.compiled = CountingCompiled(graph.compiled)
    want = [score_batch(graph, demo_batch[i:i + 4], cfg).probability for i in range(0, 16, 4)]
    for _ in range(3):
        score_batch(graph, demo_batch, cfg)
    assert counting.made == 0  # the request of the load-time check was kept and is reused

    start = threading.Barrier(4)

    def score(i: int) -> torch.Tensor:
        start.wait()
        return score_batch(graph, demo_batch[i:i + 4], cfg).probability

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(score, range(0, 16, 4)))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert counting.made <= 4


def test_graph_is_exported_once_per_model_file_and_a_damaged_entry_is_replaced(tiny_model, demo_batch, tmp_path,
                                                                                caplog):
    settings, model, sha = tiny_model
    cfg = settings.scoring.model_copy(update={"runtime": "openvino"})
    caplog.set_level(logging.INFO, logger="plantad.models.exported")
    first = for_scoring(model, cfg, sha, tmp_path)
    entries = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(entries) == 1 and entries[0].name.startswith(sha), entries
    assert sum("exported the scoring graph" in r.message for r in caplog.records) == 1
    caplog.clear()
    again = for_scoring(model, cfg, sha, tmp_path)
    assert not any("exported" in r.message for r in caplog.records)  # read from the cache
    want = score_batch(first, demo_batch, cfg).probability
    assert torch.equal(score_batch(again, demo_batch, cfg).probability, want)

    weights = entries[0] / "model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # a torn copy
    caplog.clear()
    healed = for_scoring(model, cfg, sha, tmp_path)
    assert isinstance(healed, OpenVinoModel)
    assert any("from the cache is unusable" in r.message for r in caplog.records)
    assert any("exported the scoring graph" in r.message for r in caplog.records)
    assert torch.allclose(score_batch(healed, demo_batch, cfg).probability, want, atol=1e-6)


def test_torch_keeps_scoring_when_openvino_is_missing(tiny_model, demo_batch, tmp_path, monkeypatch, caplog):
    settings, model, sha = tiny_model
    cfg = settings.scoring.model_copy(update={"runtime": "openvino"})
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the extra were not installed
    with caplog.at_level(logging.WARNING, logger="plantad.models.exported"):
        chosen = for_scoring(model, cfg, sha, tmp_path)
    assert chosen is model
    assert "pip install 'plantad[openvino]'" in caplog.text and "scoring with torch" in caplog.text
    assert not any(tmp_path.iterdir())


def test_predictor_runs_the_graph_when_the_saved_settings_ask_for_it(trained_tiny, demo_root, demo_manifest,
                                                                     tmp_path):
    settings, result = trained_tiny
    model, _ = load_model(result.model_path)
    save_model(model, with_runtime(settings, "openvino"), tmp_path / "graph-model")
    from PIL import Image

    images = [Image.open(demo_root / p).convert("RGB") for p in demo_manifest["path"].head(6)]
    with_graph = Predictor.load(str(tmp_path / "graph-model"), graph_cache=tmp_path / "cache")
    with_torch = Predictor.load(str(result.model_path.parent))
    assert with_graph.info()["runtime"] == "openvino f32" and with_torch.info()["runtime"] == "torch"
    a, b = with_graph.score(images, with_maps=True), with_torch.score(images, with_maps=True)
    assert np.allclose([s.probability for s in a], [s.probability for s in b], atol=1e-3)
    assert [s.is_anomalous for s in a] == [s.is_anomalous for s in b]
    assert np.allclose(a[0].anomaly_map, b[0].anomaly_map, rtol=1e-3, atol=1e-4)
    assert any((tmp_path / "cache").iterdir())


def test_the_fleet_chooses_the_runtime_whatever_the_version_was_saved_with(trained_tiny, demo_root, demo_manifest,
                                                                          tmp_path, monkeypatch):
    """serve.runtime and bulk.runtime win over the version's own scoring.runtime, both ways."""
    from PIL import Image

    from plantad.config import ConfigError
    from plantad.serving.bulk.scorer import BulkScorer
    from plantad.config import ServeConfig
    from plantad.serving.holder import FixedLink, ModelHolder
    from plantad.storage import open_location
    from plantad.tracking.model_source import resolve_model
    from tiny import tiny_settings

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the node's graph cache: ~/.cache/plantad/openvino
    settings, result = trained_tiny
    model, _ = load_model(result.model_path)
    torch_dir = result.model_path.parent
    graph_dir = tmp_path / "graph-model"
    save_model(model, with_runtime(settings, "openvino"), graph_dir)
    images = [Image.open(demo_root / p).convert("RGB") for p in demo_manifest["path"].head(4)]

    cfg = ServeConfig(model_dir=str(torch_dir), device="cpu", runtime="openvino")
    holder = ModelHolder(cfg, FixedLink(resolve_model(cfg.model_uri, None)), "replica-1")
    try:
        served = holder.current
        assert served.info()["runtime"] == "openvino f32" and served.settings.scoring.runtime == "openvino"
    finally:
        holder.stop()
    assert (tmp_path / "home" / ".cache" / "plantad" / "openvino").is_dir()
    plain = Predictor.load(str(graph_dir), runtime="torch")
    assert plain.info()["runtime"] == "torch"
    assert np.allclose([s.probability for s in served.score(images)], [s.probability for s in plain.score(images)],
                       atol=PROB_TOL[False])

    bulk = tiny_settings("bulk.runtime=openvino", "bulk.cpus_per_actor=1").bulk
    threads = torch.get_num_threads()  # an actor sets its own: this is the test's process
    try:
        scorer = BulkScorer(resolve_model(str(torch_dir), None), "m", None, bulk,
                            open_location(str(demo_root), settings.s3), None)
    finally:
        torch.set_num_threads(threads)
    assert scorer.predictor.info()["runtime"] == "openvino f32"
    with pytest.raises(ConfigError, match="serve.runtime"):
        tiny_settings("serve.runtime=tensorrt")


def test_warm_up_scores_a_full_chunk(trained_tiny, monkeypatch):
    """The first real batch must not pay for the largest batch's memory: warm-up uses scoring.batch_size."""
    settings, result = trained_tiny
    predictor = Predictor.load(str(result.model_path.parent))
    sizes = []
    forward = predictor.model.forward
    monkeypatch.setattr(predictor.model, "forward", lambda x: sizes.append(x.shape[0]) or forward(x))
    predictor.warm_up()
    assert sizes == [predictor.settings.scoring.batch_size]


def test_importing_openvino_through_plantad_sends_no_telemetry():
    code = ("import sys; from plantad.models.exported import import_openvino; ov = import_openvino(); "
            "from openvino.tools.ovc import telemetry_utils, convert_impl; "
            "print(telemetry_utils.tm.__name__, convert_impl.tm.__name__, 'openvino_telemetry' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["openvino.tools.ovc.telemetry_stub"] * 2 + ["False"], out.stdout + out.stderr
