"""Bulk scoring (`plantad score`) end to end on the session's Ray cluster: a folder with corrupt files,
heatmaps, idempotent re-runs, a registry alias moved between runs, and the checks that fail fast."""

from __future__ import annotations

import io
import json
import time

import pytest
from mlflow import MlflowClient
from PIL import Image

from bulk_helpers import assert_rows_match, bulk_settings, comparable, expected_rows, folder_files, make_input
from infra.fixtures import two_versions
from plantad.cli import main as cli_main
from plantad.cluster.capacity import DoesNotFit
from plantad.serving.bulk import read_results, run_bulk
from plantad.serving.bulk.plan import MANIFEST, PARTS, model_id, plan_parts
from plantad.storage import open_location
from plantad.tracking.model_source import resolve_model
from plantad.tracking.registry import CHAMPION, set_alias


def test_plan_is_deterministic_and_names_parts_by_their_paths():
    paths = [f"c/{i:03d}.png" for i in range(10)]
    parts = plan_parts(list(reversed(paths)), 4)
    assert [len(p.relpaths) for p in parts] == [4, 4, 2] and parts[0].relpaths[0] == "c/000.png"
    assert [p.file for p in parts] == [p.file for p in plan_parts(paths, 4)]
    assert parts[0].file.startswith("part-00000-") and parts[0].file.endswith(".parquet")
    moved = plan_parts(["a/new.png", *paths], 4)  # a new image shifts every part: new names, no reuse
    assert not {p.file for p in moved} & {p.file for p in parts}


@pytest.mark.e2e
def test_a_cluster_whose_cpus_other_work_holds_is_refused_in_seconds(ray_local, trained_tiny, demo_root, tmp_path):
    """The main job leaves a Serve replica holding a CPU of the local cluster: bulk scoring beside it
    must say so, not wait for a CPU that never comes free."""
    import ray

    _, result = trained_tiny
    images = make_input(demo_root, tmp_path / "in", limit=4)
    total = ray.cluster_resources()["CPU"]
    holder = ray.remote(num_cpus=total - 0.4)(type("Replica", (), {"ping": lambda self: True})).options(
        name="main-job-replica").remote()
    try:
        ray.get(holder.ping.remote())
        started = time.monotonic()
        with pytest.raises(DoesNotFit) as caught:  # 1 actor x at least 0.25 + 0.25 for reading > 0.4
            run_bulk(bulk_settings(), str(tmp_path / "in"), str(tmp_path / "out"), str(result.model_path.parent),
                     progress=False)
        assert time.monotonic() - started < 30
        message = str(caught.value)
        assert "bulk.actors x bulk.cpus_per_actor + bulk.read_cpus = 1 x 1 + 0.25 CPUs (at least 1 x 0.25" in message
        assert f"0.4 of {total:g} CPUs free" in message and "actor Replica 'main-job-replica'" in message
        # with a floor of 0.15 per actor the same job fits beside the holder, and scores every image
        summary = run_bulk(bulk_settings("bulk.min_cpus_per_actor=0.15"), str(tmp_path / "in"),
                           str(tmp_path / "out"), str(result.model_path.parent), progress=False)
        assert summary.images == summary.scored == len(images)
    finally:
        ray.kill(holder)


@pytest.mark.e2e
def test_folder_is_scored_like_score_batch_with_error_rows_and_maps(ray_local, trained_tiny, demo_root, tmp_path):
    _, result = trained_tiny
    model_dir = result.model_path.parent
    images = make_input(demo_root, tmp_path / "in")
    good_png = (tmp_path / "in" / next(r for r in images if not r.startswith("bad/"))).read_bytes()
    (tmp_path / "in" / "loose.png").write_bytes(good_png)  # at the input's root
    images.append("loose.png")
    out = tmp_path / "out"
    summary = run_bulk(bulk_settings(), str(tmp_path / "in"), str(out), str(model_dir), str(tmp_path / "maps"),
                       progress=False)
    mid = model_id(resolve_model(str(model_dir), None))
    assert summary.output == str(out / mid) and [p.name for p in out.iterdir()] == [mid]
    table = read_results(open_location(str(out / mid), bulk_settings().s3))
    assert len(table) == len(images) == summary.images == summary.scored
    assert_rows_match(table, expected_rows(folder_files(tmp_path / "in"), model_dir))
    assert summary.errors == 4 and summary.anomalous == int(table["is_anomalous"].fillna(False).sum())
    assert summary.parts == -(-len(images) // 8) and summary.skipped_parts == 0
    assert set(table["model_uri"]) == {str(model_dir)} and table["model_version"].isna().all()
    assert json.loads(table["teacher"].iloc[0])["name"] == "vit_small_patch14_dinov2"
    assert table["scored_at"].notna().all() and table["path"].iloc[0].startswith(str(tmp_path / "in"))
    good = table[table["error"].isna()]
    heat = Image.open(io.BytesIO(open(good["map_path"].iloc[0], "rb").read()))
    assert heat.size == (good["width"].iloc[0], good["height"].iloc[0])
    assert (tmp_path / "maps" / mid / f"{good['relpath'].iloc[0]}.heatmap.png").is_file()
    assert table.loc[table["error"].notna(), "map_path"].isna().all()
    folders = table["relpath"].map(lambda rel: rel.split("/")[0] if "/" in rel else ".")
    assert summary.by_folder == {
        name: {"images": int((folders == name).sum()), "anomalous": int(table["is_anomalous"][folders == name].sum()),
               "errors": int(table["error"][folders == name].notna().sum())} for name in sorted(set(folders))}
    assert list(summary.by_folder) == [".", "bad", "metal", "nut", "weave"]
    assert summary.by_folder["bad"] == {"images": 4, "anomalous": 0, "errors": 4}
    assert summary.by_folder["."]["images"] == 1 and "  bad    4 images, 0 anomalous, 4 failed" in summary.text()
    assert json.loads((out / mid / MANIFEST).read_text())["summary"]["by_folder"] == summary.by_folder

    again = run_bulk(bulk_settings(), str(tmp_path / "in"), str(out), str(model_dir), progress=False)
    assert (again.scored, again.skipped_parts, again.images, again.errors) == (0, summary.parts, len(images), 4)
    assert comparable(read_results(open_location(str(out / mid), bulk_settings().s3))).equals(comparable(table))

    # another folder into the same output would re-plan the table and delete these rows: refused, untouched
    make_input(demo_root, tmp_path / "line-2", limit=3)
    stored = {p.name: p.read_bytes() for p in (out / mid).rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=f"{out / mid} holds the finished table of {tmp_path / 'in'}, not of "
                                         f"{tmp_path / 'line-2'}: .* its own output \\(--output"):
        run_bulk(bulk_settings(), str(tmp_path / "line-2"), str(out), str(model_dir), progress=False)
    assert {p.name: p.read_bytes() for p in (out / mid).rglob("*") if p.is_file()} == stored


@pytest.mark.e2e
def test_each_champion_version_writes_its_own_table(ray_local, trained_tiny, demo_root, tmp_path):
    _, result = trained_tiny
    images = make_input(demo_root, tmp_path / "in", limit=6)
    uri, _, versions = two_versions(result.model_path.parent, (tmp_path / "in" / images[-1]).read_bytes(), tmp_path,
                                    "bulkreg")
    client = MlflowClient(uri)
    settings = bulk_settings(f"mlflow.tracking_uri={uri}")
    out = tmp_path / "out"
    set_alias(client, "bulkreg", CHAMPION, versions[0])
    first = run_bulk(settings, str(tmp_path / "in"), str(out), "models:/bulkreg@champion", progress=False)
    assert first.output == str(out / f"bulkreg-v{versions[0]}") and first.model.endswith("(@champion)")
    manifest_v1 = (out / f"bulkreg-v{versions[0]}" / MANIFEST).read_bytes()
    set_alias(client, "bulkreg", CHAMPION, versions[1])
    second = run_bulk(settings, str(tmp_path / "in"), str(out), "models:/bulkreg@champion", progress=False)
    assert second.output == str(out / f"bulkreg-v{versions[1]}") and second.scored == len(images)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"bulkreg-v{v}" for v in versions)
    assert (out / f"bulkreg-v{versions[0]}" / MANIFEST).read_bytes() == manifest_v1  # v1's table untouched
    for version in versions:
        table = read_results(open_location(str(out / f"bulkreg-v{version}"), settings.s3))
        assert len(table) == len(images) and set(table["model_version"]) == {version}
        assert set(table["model_alias"]) == {CHAMPION} and set(table["model_name"]) == {"bulkreg"}
        assert set(table["model_uri"]) == {f"models:/bulkreg/{version}"}
        assert_rows_match(table, expected_rows(folder_files(tmp_path / "in"), result.model_path.parent))


def test_missing_or_empty_input_fails_naming_it(tmp_path, trained_tiny, capsys):
    _, result = trained_tiny
    settings = bulk_settings()
    with pytest.raises(FileNotFoundError, match=f"input folder {tmp_path / 'nope'} does not exist"):
        run_bulk(settings, str(tmp_path / "nope"), str(tmp_path / "out"), str(result.model_path.parent))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    code = cli_main(["score", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out"),
                     "--model", str(result.model_path.parent)])
    assert code == 2 and "no images (.png, .jpg" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob(f"{PARTS}/*"))


def test_unreachable_s3_and_mlflow_fail_in_seconds_naming_the_address(tmp_path, trained_tiny, demo_root, moto_s3):
    """moto_s3 only provides AWS credentials: the endpoint here is a port nobody listens on."""
    from infra.fixtures import free_port

    from plantad.tracking.s3 import StorageError
    from plantad.tracking.store import TrackingStoreError

    _, result = trained_tiny
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach bucket 'b' at {dead}"):
        run_bulk(bulk_settings(f"s3.endpoint_url={dead}"), "s3://b/in", str(tmp_path / "out"),
                 str(result.model_path.parent))
    assert time.monotonic() - start < 20
    make_input(demo_root, tmp_path / "in", limit=2)
    start = time.monotonic()
    with pytest.raises(TrackingStoreError, match=f"MLflow tracking server {dead} is not reachable"):
        run_bulk(bulk_settings(f"mlflow.tracking_uri={dead}"), str(tmp_path / "in"), str(tmp_path / "out"),
                 "models:/plantad-anomaly@champion")
    assert time.monotonic() - start < 15
