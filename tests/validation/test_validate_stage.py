"""pipelines/validate.py as DVC runs it: a subprocess whose exit code stops `dvc repro`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from manifest_files import SIZE, add_image, with_rows

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pipelines" / "validate.py"

# Runs the stage script with every outbound connection and DNS lookup reported and refused.
NO_NETWORK = """
import runpy, socket, sys
def refuse(*args, **kwargs):
    print(f"NETWORK CALL ATTEMPTED: {args!r}", file=sys.stderr)
    raise OSError("network disabled in this test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_stage(*args: str | Path, offline: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    prefix = [sys.executable, "-c", NO_NETWORK] if offline else [sys.executable]
    cmd = [*prefix, str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("validation:\n  min_train_normal_per_category: 3\n  example_rows: 5\n")
    return path


def read_report(out: Path) -> dict:
    return json.loads((out / "validation.json").read_text())["report"]


def test_stage_passes_on_good_manifest(good_parquet: Path, params: Path, tmp_path: Path) -> None:
    out = tmp_path / "validation"
    proc = run_stage("--manifest", good_parquet, "--out", out, "--params", params)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "manifest valid: 21 expectations passed on 10 rows"
    assert proc.stderr == ""
    assert read_report(out)["success"] is True
    assert (out / "data_docs" / "index.html").is_file()


def test_stage_fails_with_summary_on_stderr(
    good_manifest: pd.DataFrame, dataset_root: Path, params: Path, tmp_path: Path
) -> None:
    i = good_manifest.index[good_manifest["label"] == 1][0]
    category = good_manifest.at[i, "category"]
    masked = add_image(dataset_root, f"{category}/test/dent/stage.png", category, "test", "dent", mask_size=SIZE)
    good_manifest.loc[i, ["mask_path", "mask_width", "mask_height"]] = pd.NA  # its category has masks
    manifest = tmp_path / "manifest.parquet"
    with_rows(good_manifest, masked).to_parquet(manifest, index=False)
    out = tmp_path / "validation"
    proc = run_stage("--manifest", manifest, "--out", out, "--params", params)
    assert proc.returncode == 1
    assert "anomalous test images have masks" in proc.stderr
    assert good_manifest.at[i, "path"] in proc.stderr
    assert proc.stdout == ""
    report = read_report(out)
    assert report["success"] is False
    assert [f["expectation"] for f in report["failures"]] == ["anomalous test images have masks"]


def test_stage_reads_params_and_stays_offline(good_parquet: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("validation:\n  min_train_normal_per_category: 4\n")
    proc = run_stage("--manifest", good_parquet, "--out", tmp_path / "v", "--params", params, offline=True)
    assert "NETWORK CALL ATTEMPTED" not in proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert "enough normal train images per category" in proc.stderr
    (failure,) = read_report(tmp_path / "v")["failures"]
    assert {(ex["category"], ex["train_normal_images_in_category"]) for ex in failure["examples"]} == {
        ("metal", 3), ("weave", 3),
    }  # fmt: skip


def test_stage_rejects_bad_params_and_missing_manifest(
    good_parquet: Path, params: Path, tmp_path: Path
) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("validation:\n  min_train_normals: 4\n")
    proc = run_stage("--manifest", good_parquet, "--out", tmp_path / "v", "--params", typo)
    assert proc.returncode == 2 and "unknown key 'validation.min_train_normals'" in proc.stderr
    proc = run_stage("--manifest", tmp_path / "nope.parquet", "--out", tmp_path / "v", "--params", params)
    assert proc.returncode == 2 and "nope.parquet not found" in proc.stderr
    assert not (tmp_path / "v").exists()
