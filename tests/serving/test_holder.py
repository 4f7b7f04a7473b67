"""Following the alias through a store outage: a version that could not be fetched is fetched again
(with a backoff) once the store answers, without the alias moving; a broken version is not retried."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from infra.fixtures import wait_for
from plantad.serving.holder import ModelHolder, golden_image
from plantad.tracking.registry import set_alias

MODEL = "plantad-serve-test"  # the registry fixture's (conftest.py)
ALIAS = "line-7"


def artifacts_of(registry, version: str) -> Path:
    uri = registry.client.get_model_version_download_uri(MODEL, version)
    return Path(urlsplit(uri).path if uri.startswith("file:") else uri)


@pytest.fixture
def holder(registry):
    set_alias(registry.client, MODEL, ALIAS, registry.good[0])
    h = ModelHolder(f"models:/{MODEL}@{ALIAS}", registry.uri, "cpu", 0.2, golden_image(None))
    yield h
    h.stop()


def test_a_version_the_store_did_not_deliver_is_fetched_again_when_it_answers(registry, holder):
    old, new = registry.good
    folder = artifacts_of(registry, new)
    hidden = folder.with_name(folder.name + ".offline")
    folder.rename(hidden)  # the artifact store is down for this version's files
    try:
        set_alias(registry.client, MODEL, ALIAS, new)
        wait_for(lambda: (holder.last_swap_error or 0) and holder.last_swap_error.failures >= 2, 30,
                 "two failed fetches")
        err = holder.status()["last_swap_error"]
        assert err["version"] == new and "cannot download" in err["error"] and err["retry_at"] > err["at"]
        assert holder.current.ref.version == old
    finally:
        hidden.rename(folder)
    wait_for(lambda: holder.current.ref.version == new, 60, "the swap once the store answers")
    assert holder.last_swap_error is None and holder.swaps == 1


def test_a_broken_version_is_not_loaded_again(registry, holder, caplog):
    caplog.set_level(logging.WARNING, logger="plantad.serving.holder")
    set_alias(registry.client, MODEL, ALIAS, registry.broken)
    wait_for(lambda: holder.last_swap_error is not None, 30, "the refused version")
    time.sleep(1.5)  # seven more polls
    err = holder.status()["last_swap_error"]
    assert err["version"] == registry.broken and err["retry_at"] is None and "model.pt" in err["error"]
    refused = [r for r in caplog.records if "not served" in r.getMessage()]
    assert len(refused) == 1 and holder.current.ref.version == registry.good[0]
