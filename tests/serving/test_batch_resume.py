"""Bulk scoring survives a SIGKILL of its driver (the re-run scores only what is missing, one row per
image, equal to an uninterrupted run), reads and writes S3 (moto), and runs as the DVC stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bulk_helpers import assert_rows_match, bulk_settings, comparable, expected_rows, folder_files, make_input
from plantad.config import settings_to_dict
from plantad.serving.bulk import read_results, run_bulk
from plantad.serving.bulk.lock import LOCK
from plantad.serving.bulk.plan import MANIFEST, PARTS, model_id, plan_parts
from plantad.storage import open_location
from plantad.tracking.model_source import resolve_model
from plantad.tracking.s3 import s3_client

REPO = Path(__file__).resolve().parents[2]


def _subprocess_env() -> dict[str, str]:
    """The CLI as a user runs it, joining the session's Ray cluster (token auth is in os.environ)."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}


def _params_file(path: Path, *extra: str) -> Path:
    path.write_text(yaml.safe_dump(settings_to_dict(bulk_settings(*extra))))
    return path


@pytest.mark.e2e
def test_sigkill_of_the_driver_then_rerun_gives_exactly_one_row_per_image(ray_local, trained_tiny, demo_root,
                                                                          tmp_path):
    _, result = trained_tiny
    model_dir = str(result.model_path.parent)
    images = make_input(demo_root, tmp_path / "in", splits=("train", "test"))
    extra = ("bulk.part_size=4", "bulk.batch_size=4")
    out = tmp_path / "out" / model_id(resolve_model(model_dir, None))
    cmd = [sys.executable, "-m", "plantad.cli", "score", "--input", str(tmp_path / "in"), "--output",
           str(tmp_path / "out"), "--model", model_dir, "--config", str(_params_file(tmp_path / "p.yaml", *extra))]
    proc = subprocess.Popen(cmd, env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, committed = [], 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            committed += "committed " in line and ".parquet" in line
            if committed == 3:
                proc.kill()  # SIGKILL: no handler, no cleanup, whatever the driver was doing
                break
    finally:
        proc.kill()
        proc.wait(60)
    assert committed == 3, "".join(lines[-40:])
    done = {p.name for p in (out / PARTS).glob("part-*.parquet")}
    plan = plan_parts(images, 4)
    assert not (out / MANIFEST).exists() and 3 <= len(done) < len(plan), (len(done), len(plan))
    assert (out / LOCK).is_file()  # the killed driver's lock: its process has ended, so the re-run takes it

    settings = bulk_settings(*extra)
    resumed = run_bulk(settings, str(tmp_path / "in"), str(tmp_path / "out"), model_dir, progress=False)
    planned = {p["file"].removeprefix(f"{PARTS}/"): p["rows"] for p in json.loads((out / MANIFEST).read_text())["parts"]}
    assert len(planned) == len(plan) and done <= set(planned) and resumed.skipped_parts == len(done)
    assert resumed.scored == sum(rows for name, rows in planned.items() if name not in done) < len(images)
    table = read_results(open_location(str(out), settings.s3))
    assert len(table) == len(images) == resumed.images and table["relpath"].is_unique
    assert sorted(os.listdir(out / PARTS)) == sorted(planned)  # no temporary or stray files
    assert not (out / LOCK).exists()
    clean = run_bulk(settings, str(tmp_path / "in"), str(tmp_path / "clean"), model_dir, progress=False)
    assert clean.scored == len(images)
    reference = read_results(open_location(clean.output, settings.s3))
    pd.testing.assert_frame_equal(comparable(table).drop(columns="path"), comparable(reference).drop(columns="path"),
                                  check_exact=False, rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_s3_prefix_is_scored_into_s3(ray_local, moto_s3, trained_tiny, demo_root, tmp_path):
    _, result = trained_tiny
    model_dir = result.model_path.parent
    make_input(demo_root, tmp_path / "in", limit=10)
    files = folder_files(tmp_path / "in")
    client = s3_client(moto_s3)
    for rel, data in files.items():
        client.put_object(Bucket=moto_s3.bucket, Key=f"bulk-in/{rel}", Body=data)
    client.put_object(Bucket=moto_s3.bucket, Key="bulk-in/notes.txt", Body=b"not an image")
    settings = bulk_settings(f"s3.endpoint_url={moto_s3.endpoint_url}", f"s3.bucket={moto_s3.bucket}")
    bucket = f"s3://{moto_s3.bucket}"
    summary = run_bulk(settings, f"{bucket}/bulk-in", f"{bucket}/bulk-out", str(model_dir), f"{bucket}/bulk-maps",
                       progress=False)
    mid = model_id(resolve_model(str(model_dir), None))
    assert summary.output == f"{bucket}/bulk-out/{mid}" and (summary.images, summary.errors) == (len(files), 4)
    table = read_results(open_location(summary.output, moto_s3))
    assert_rows_match(table, expected_rows(files, model_dir))
    assert table["path"].str.startswith(f"{bucket}/bulk-in/").all()
    maps = {o["Key"] for o in client.list_objects_v2(Bucket=moto_s3.bucket, Prefix="bulk-maps/")["Contents"]}
    good = table[table["error"].isna()]
    assert maps == {f"bulk-maps/{mid}/{rel}.heatmap.png" for rel in good["relpath"]}
    assert set(good["map_path"]) == {f"{bucket}/{key}" for key in maps}
    again = run_bulk(settings, f"{bucket}/bulk-in", f"{bucket}/bulk-out", str(model_dir), progress=False)
    assert (again.scored, again.images) == (0, len(files))
    with pytest.raises(FileNotFoundError, match=f"no images .* under {bucket}/nothing-here"):
        run_bulk(settings, f"{bucket}/nothing-here", f"{bucket}/bulk-out", str(model_dir))


@pytest.mark.e2e
def test_dvc_stage_script_is_a_no_op_unless_enabled(ray_local, trained_tiny, demo_root, tmp_path):
    _, result = trained_tiny
    images = make_input(demo_root, tmp_path / "in", limit=5)
    script = str(REPO / "pipelines" / "score.py")
    off = _params_file(tmp_path / "off.yaml")
    subprocess.run([sys.executable, script, "--params", str(off), "--out", "off.json"], cwd=tmp_path, check=True,
                   env=_subprocess_env(), timeout=120)
    assert json.loads((tmp_path / "off.json").read_text())["enabled"] is False
    assert not (tmp_path / "outputs").exists()
    on = _params_file(tmp_path / "on.yaml", "bulk.stage.enabled=true", "bulk.stage.input=in",
                      "bulk.stage.output=scores", f"bulk.stage.model={result.model_path.parent}")
    proc = subprocess.run([sys.executable, script, "--params", str(on), "--out", "on.json"], cwd=tmp_path,
                          env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "on.json").read_text())
    assert record["enabled"] is True and record["images"] == len(images) and record["errors"] == 4
    assert len(read_results(open_location(record["output"], bulk_settings().s3))) == len(images)
    assert Path(record["output"]).parent == tmp_path / "scores"


@pytest.mark.e2e
def test_two_runs_racing_into_one_output_one_scores_and_new_settings_score_a_new_table(ray_local, trained_tiny,
                                                                                       demo_root, tmp_path):
    """The second run refuses naming the first; adding --maps later re-scores every part (with maps)
    instead of skipping the parts scored without, and the old parts go once the new manifest is in."""
    import threading

    from plantad.serving.bulk.lock import LockHeld

    _, result = trained_tiny
    model_dir = str(result.model_path.parent)
    images = make_input(demo_root, tmp_path / "in", limit=6)
    settings = bulk_settings()
    barrier, outcomes = threading.Barrier(2), []

    def run() -> None:
        barrier.wait()
        try:
            outcomes.append(run_bulk(settings, str(tmp_path / "in"), str(tmp_path / "out"), model_dir, progress=False))
        except LockHeld as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    refused = [o for o in outcomes if isinstance(o, LockHeld)]
    scored = [o for o in outcomes if not isinstance(o, LockHeld)]
    assert len(refused) == 1 and len(scored) == 1, outcomes
    assert "is held by run " in str(refused[0]) and "another bulk scoring run is writing" in str(refused[0])
    out = Path(scored[0].output)
    assert scored[0].scored == len(images) and not (out / LOCK).exists()
    first_parts = set(os.listdir(out / PARTS))

    with_maps = run_bulk(settings, str(tmp_path / "in"), str(tmp_path / "out"), model_dir, str(tmp_path / "maps"),
                         progress=False)
    assert (with_maps.scored, with_maps.skipped_parts) == (len(images), 0)
    table = read_results(open_location(str(out), settings.s3))
    assert len(table) == len(images) and table["relpath"].is_unique
    assert table.loc[table["error"].isna(), "map_path"].notna().all()
    assert not set(os.listdir(out / PARTS)) & first_parts  # the table without maps is gone, not mixed in
    assert json.loads((out / MANIFEST).read_text())["identity"]["maps"] == str(tmp_path / "maps" / out.name)
    again = run_bulk(settings, str(tmp_path / "in"), str(tmp_path / "out"), model_dir, str(tmp_path / "maps"),
                     progress=False)
    assert again.scored == 0
    without = run_bulk(settings, str(tmp_path / "in"), str(tmp_path / "out"), model_dir, progress=False)
    assert without.scored == 0  # a finished table with heatmaps serves a run without them
