"""Chaos, part (e): two `plantad score` runs into one output at once, locally and on S3.

A trial starts one bulk run (the CLI, as a user or a scheduler starts it, joining the shared Ray
cluster), then a second one with the same input, model and output after a random delay drawn from
the first's uninterrupted duration (the first trial starts both together). The output lock must let
exactly one of them score: the other stops before scoring with an error that names the holder, or,
if it started after the first finished, finds the table complete and scores nothing. Then the
loser is run again, as its user would, and must finish without re-scoring anything.
Recovered: the table then holds exactly one row per image, no lock is left, and the loser's re-run
scored 0 images. Data lost: a missing or duplicated row, an unreadable table (a part that the
manifest names and the store does not hold makes it unreadable), or a lock left behind.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from chaos_common import Row

from plantad.config import settings_to_dict

HELD = "is held by run "


def _params(path: Path, *extra: str) -> Path:
    from bulk_helpers import bulk_settings

    path.write_text(yaml.safe_dump(settings_to_dict(bulk_settings("bulk.part_size=4", "bulk.batch_size=4", *extra))))
    return path


def _env() -> dict[str, str]:
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, what: str, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"{what} did not end within {timeout:.0f} s") from None


def _table_problems(output: str, s3, n: int) -> list[str]:
    from plantad.serving.bulk.lock import read_holder
    from plantad.serving.bulk.plan import read_results
    from plantad.storage import open_location

    out = open_location(output, s3)
    try:
        table = read_results(out)
    except Exception as exc:  # noqa: BLE001 - any failure to read the table is the finding
        return [f"table unreadable: {type(exc).__name__}: {exc}"[:200]]
    problems = [] if len(table) == n and table["relpath"].is_unique else [
        f"{len(table)} rows for {table['relpath'].nunique()} images of {n}"]
    return problems + ([f"lock left behind: {read_holder(out)}"] if read_holder(out) is not None else [])


def race_trial(cmd: list[str], delay: float, work: Path, output_of: str, s3, n: int) -> dict:
    """Two runs of `cmd`, the second `delay` s after the first; then the loser again."""
    first = _start(cmd, work / "first.log")
    time.sleep(delay)
    second = _start(cmd, work / "second.log")
    codes = {"first": _wait(first, "the first bulk run"), "second": _wait(second, "the second bulk run")}
    logs = {k: (work / f"{k}.log").read_text() for k in codes}
    refused = [k for k in codes if codes[k] != 0 and HELD in logs[k]]
    crashed = [f"{k} exit {codes[k]}: {logs[k][-200:]}" for k in codes if codes[k] != 0 and k not in refused]
    scored = {k: _scored(logs[k]) for k in codes if codes[k] == 0}
    loser = refused[0] if refused else min(scored, key=lambda k: scored[k], default="second")
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    return {"delay": delay, "refused": refused, "crashed": crashed, "scored": scored,
            "rerun_exit": again.returncode, "rerun_scored": _scored(again.stdout) if again.returncode == 0 else None,
            "loser": loser, "problems": _table_problems(output_of, s3, n)}


def _scored(log: str) -> int | None:
    """The number of images a run scored, from the summary `plantad score` prints."""
    found = re.findall(r"scored (\d+)", log)
    return int(found[-1]) if found else None


def race_rows(work: Path, k: int, rng: random.Random, s3) -> list[Row]:
    from chaos_node import tiny_model_and_images

    from plantad.serving.bulk.plan import model_id
    from plantad.tracking.model_source import resolve_model
    from plantad.tracking.s3 import s3_client

    work.mkdir(parents=True, exist_ok=True)
    model_dir, images = tiny_model_and_images(work, n_images=24)
    n = len(list(images.iterdir()))
    mid = model_id(resolve_model(str(model_dir), None))
    client = s3_client(s3)
    for path in sorted(images.iterdir()):
        client.put_object(Bucket=s3.bucket, Key=f"race-in/{path.name}", Body=path.read_bytes())
    rows = []
    for where in ("local", "s3"):
        params = _params(work / f"{where}.yaml", f"s3.endpoint_url={s3.endpoint_url}", f"s3.bucket={s3.bucket}")
        trials = []
        for i in range(k + 1):  # trial 0 times an uninterrupted run for the delays
            base = str(work / where / f"out-{i}") if where == "local" else f"s3://{s3.bucket}/race-{rng.getrandbits(32):08x}"
            source = str(images) if where == "local" else f"s3://{s3.bucket}/race-in"
            cmd = [sys.executable, "-m", "plantad.cli", "score", "--input", source, "--output", base,
                   "--model", str(model_dir), "--config", str(params)]
            trial_dir = work / where / f"trial-{i}"
            trial_dir.mkdir(parents=True)
            if i == 0:
                started = time.monotonic()
                done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    raise RuntimeError(f"an uninterrupted bulk run failed: {done.stdout[-500:]}{done.stderr[-500:]}")
                solo = time.monotonic() - started
                continue
            delay = 0.0 if i == 1 else rng.uniform(0.0, solo)
            trials.append(race_trial(cmd, delay, trial_dir, f"{base}/{mid}", s3, n))
        ok = sum(len(t["refused"]) + sum(v == 0 for v in t["scored"].values()) == 1 and not t["crashed"]
                 and t["rerun_exit"] == 0 and t["rerun_scored"] == 0 and not t["problems"] for t in trials)
        lost = sum(bool(t["problems"]) for t in trials)
        note = "; ".join(
            f"{t['delay']:.1f} s: " + (f"{t['loser']} refused naming the holder" if t["refused"] else
                                       f"{t['loser']} found the table complete") +
            (f", re-run scored {t['rerun_scored']}" if t["rerun_scored"] is not None else f", re-run exit {t['rerun_exit']}")
            + "".join(f", {p}" for p in t["problems"] + t["crashed"]) for t in trials)
        rows.append(Row(f"two `plantad score` runs into one {'folder' if where == 'local' else 'S3 prefix'} at once",
                        len(trials), ok, lost, f"{n} images, an uninterrupted run {solo:.0f} s; second run started at "
                        + note))
    return rows
