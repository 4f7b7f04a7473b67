"""Fixtures of the exported-graph tests: the session's trained tiny model, loaded once per module,
and a graph cache per module (a graph is exported, or quantized, once per module)."""

from __future__ import annotations

import pytest

from plantad.models.checkpoint import META_FILE, load_model, recorded_sha256


@pytest.fixture(scope="module")
def tiny_model(trained_tiny):
    settings, result = trained_tiny
    model, _ = load_model(result.model_path)
    return settings, model, recorded_sha256(result.model_path.parent / META_FILE)


@pytest.fixture(scope="module")
def graph_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")
