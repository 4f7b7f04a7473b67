"""A replica following its rollout controller (in-process here; the Serve app uses a Ray actor):
store outages retried, broken versions refused, recorded golden outputs checked, last-known-good
at start, and a move back during a slow load honoured."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import pytest

from infra.fixtures import wait_for
from plantad.config import ServeConfig
from plantad.serving import predictor as predictor_module
from plantad.serving.holder import LocalLink, ModelHolder
from plantad.serving.rollout import RolloutController
from plantad.models.checkpoint import SHA256_KEY
from plantad.tracking.model_source import (
    META_SHA256_TAG, ModelSourceError, cache_entry, download_model, registration_tags, resolve_model,
)
from plantad.tracking.registry import logged_model_id, register_version, set_alias
from rollout_versions import versions  # noqa: F401  (module fixture)

MODEL = "plantad-serve-test"  # the registry fixture's (conftest.py)
ALIAS = "line-7"


def artifacts_of(client, name: str, version: str) -> Path:
    uri = client.get_model_version_download_uri(name, version)
    return Path(urlsplit(uri).path if uri.startswith("file:") else uri)


def follow(uri: str, name: str, alias: str, cache: Path | None = None) -> tuple[RolloutController, ModelHolder]:
    cfg = ServeConfig(model_name=name, model_alias=alias, tracking_uri=uri, alias_poll_s=0.2,
                      model_cache_dir=None if cache is None else str(cache),
                      rollout={"follow_s": 0.2, "last_known_good_alias": f"{alias}-lkg"})
    controller = RolloutController(cfg)
    controller.start()
    return controller, ModelHolder(cfg, LocalLink(controller), "replica-1")


@pytest.fixture
def holder(registry, tmp_path):
    set_alias(registry.client, MODEL, ALIAS, registry.good[0])
    controller, h = follow(registry.uri, MODEL, ALIAS, tmp_path / "node-cache")
    yield h
    h.stop()
    controller.stop()


def test_a_version_the_store_did_not_deliver_is_fetched_again_when_it_answers(registry, holder):
    old, new = registry.good
    folder = artifacts_of(registry.client, MODEL, new)
    hidden = folder.with_name(folder.name + ".offline")
    folder.rename(hidden)  # the artifact store is down for this version's files
    # and the node has no copy: the two versions hold the same files, so they share one cache entry
    shutil.rmtree(cache_entry(holder.cache_dir, resolve_model(f"models:/{MODEL}/{new}", registry.client)))
    try:
        set_alias(registry.client, MODEL, ALIAS, new)
        wait_for(lambda: new in holder.waiting and holder.waiting[new].failures >= 2, 30, "two failed fetches")
        err = holder.status()["last_swap_error"]
        assert err["version"] == new and "cannot download" in err["error"] and err["retry_at"] > err["at"]
        assert holder.current.ref.version == old
    finally:
        hidden.rename(folder)
    wait_for(lambda: holder.current.ref.version == new, 60, "the swap once the store answers")
    assert holder.last_error() is None and holder.swaps == 1


def test_a_broken_version_is_not_loaded_again(registry, holder, caplog):
    caplog.set_level(logging.WARNING, logger="plantad.serving.holder")
    set_alias(registry.client, MODEL, ALIAS, registry.broken)
    wait_for(lambda: holder.last_error() is not None, 30, "the refused version")
    time.sleep(1.5)  # seven more polls
    err = holder.status()["last_swap_error"]
    assert err["version"] == registry.broken and err["retry_at"] is None and "model.pt" in err["error"]
    refused = [r for r in caplog.records if "not served" in r.getMessage()]
    assert len(refused) == 1 and holder.current.ref.version == registry.good[0]


def test_recorded_golden_outputs_refuse_a_version_and_a_restart_serves_last_known_good(versions):
    c, name = versions.client, versions.name
    set_alias(c, name, "line-9", versions.a)
    controller, holder = follow(versions.uri, name, "line-9")
    try:
        assert holder.status()["self_test"].startswith("1 golden image(s) within 0.01")
        wait_for(lambda: controller.state().last_known_good == versions.a, 30, "v-a becoming last-known-good")
        set_alias(c, name, "line-9", versions.bad)  # valid files, outputs recorded are not its own
        wait_for(lambda: holder.last_error() is not None, 60, "the golden check refusing the version")
        err = holder.last_error()
        assert err.version == versions.bad and "golden.png probability" in err.error and "recorded" in err.error
        assert holder.current.ref.version == versions.a and err.retry_at is None
        restarted = ModelHolder(holder.cfg, holder.link, "replica-2")  # a replica that starts now
        try:
            assert restarted.current.ref.version == versions.a and restarted.serving_last_known_good
            assert restarted.status()["serving_last_known_good"] and restarted.status()["declared_champion"] == versions.bad
        finally:
            restarted.stop()
    finally:
        holder.stop()
        controller.stop()


def test_a_move_back_during_a_slow_load_wins(versions, monkeypatch):
    c, name = versions.client, versions.name
    set_alias(c, name, "line-11", versions.a)
    controller, holder = follow(versions.uri, name, "line-11")
    real_warm_up = predictor_module.Predictor.warm_up
    moved = []

    def warm_up_while_a_person_moves_back(self):  # the person rolls back while v-b is loading
        if self.ref.version == versions.b and not moved:
            set_alias(c, name, "line-11", versions.a)
            moved.append(time.time())
        real_warm_up(self)

    monkeypatch.setattr(predictor_module.Predictor, "warm_up", warm_up_while_a_person_moves_back)
    try:
        set_alias(c, name, "line-11", versions.b)
        wait_for(lambda: moved, 30, "the load of v-b")
        time.sleep(1.0)  # five polls after the load
        assert holder.current.ref.version == versions.a and holder.swaps == 0
    finally:
        holder.stop()
        controller.stop()


def test_a_node_fetches_a_version_once_and_fetches_a_damaged_copy_again(registry, tmp_path):
    set_alias(registry.client, MODEL, "line-13", registry.good[0])
    controller, first = follow(registry.uri, MODEL, "line-13", tmp_path / "node-cache")
    second = third = None
    try:
        entry = cache_entry(tmp_path / "node-cache", first.current.ref)
        weights = next(entry.rglob("model.pt"))
        fetched = weights.stat().st_ino
        second = ModelHolder(first.cfg, first.link, "replica-2")  # another replica on the node: no download
        assert next(entry.rglob("model.pt")).stat().st_ino == fetched
        weights.write_bytes(b"bit rot")  # the cached copy is damaged
        third = ModelHolder(first.cfg, first.link, "replica-3")
        assert third.current.ref.version == registry.good[0] and third.last_error() is None
        assert next(entry.rglob("model.pt")).read_bytes() != b"bit rot"
    finally:
        for h in (first, second, third):
            if h is not None:
                h.stop()
        controller.stop()


def test_the_node_cache_is_keyed_by_the_files_sha256_and_refuses_files_other_than_registered(registry, tmp_path):
    client, cache = registry.client, tmp_path / "node-cache"
    first, second = (resolve_model(f"models:/{MODEL}/{v}", client) for v in registry.good)  # the same files
    digest = first.tags[META_SHA256_TAG]
    assert cache_entry(cache, first) == cache_entry(cache, second) == cache / MODEL / f"sha256-{digest}"
    fetched = download_model(first, registry.uri, cache)
    assert download_model(second, registry.uri, cache) == fetched  # one copy for both versions
    assert registration_tags(fetched) == {k: first.tags[k] for k in (SHA256_KEY, META_SHA256_TAG)}
    # versions whose tags name other files than their artifact holds: refused, nothing cached as complete
    good = client.get_model_version(MODEL, registry.good[0])
    mlflow.set_tracking_uri(registry.uri)  # the SQL registry looks the logged model up in the global store
    try:
        lied = [register_version(client, "plantad-sha-test", good.run_id, "model", tags=tags,
                                 model_id=logged_model_id(good)).version
                for tags in ({META_SHA256_TAG: "0" * 64}, {SHA256_KEY: "1" * 64})]
    finally:
        mlflow.set_tracking_uri(None)
    for version, what, tagged, found in ((lied[0], "model.json", "0" * 64, digest),
                                         (lied[1], "model.pt", "1" * 64, first.tags[SHA256_KEY])):
        ref = resolve_model(f"models:/plantad-sha-test/{version}", client)
        with pytest.raises(ModelSourceError, match=f"registered with {what} sha256 {tagged}.*give {found}"):
            download_model(ref, registry.uri, cache)
        assert not (cache_entry(cache, ref) / ".complete").exists()
    assert (cache_entry(cache, first) / ".complete").is_file()  # the good copy is untouched


def test_a_swap_that_does_not_fit_the_reserved_memory_is_refused_naming_the_sizes(registry):
    set_alias(registry.client, MODEL, "line-15", registry.good[0])
    cfg = ServeConfig(model_name=MODEL, model_alias="line-15", tracking_uri=registry.uri, alias_poll_s=0.2,
                      rollout={"follow_s": 0.2, "last_known_good_alias": "line-15-lkg"})
    controller = RolloutController(cfg)
    controller.start()
    # 1 MiB reserved: the first version always loads, no second one fits beside it (a margin over the
    # process's size would depend on what earlier tests left for the allocator to give back)
    holder = ModelHolder(cfg, LocalLink(controller), "replica-1", reserved_bytes=2**20)
    try:
        assert holder.footprints[registry.good[0]] > 0
        set_alias(registry.client, MODEL, "line-15", registry.good[1])
        wait_for(lambda: registry.good[1] in holder.waiting, 30, "the refused swap")
        err = holder.waiting[registry.good[1]]
        assert "it reserves (serve.ray_actor_options.memory)" in err.error and "MiB" in err.error, err.error
        assert err.retry_at is not None and holder.current.ref.version == registry.good[0]
    finally:
        holder.stop()
        controller.stop()
