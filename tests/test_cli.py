"""The stable command-line interface, run as a user would (subprocesses of the installed CLI)."""

import json
import subprocess
import sys
from pathlib import Path

from tiny import TINY

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")

CLI = [sys.executable, "-m", "plantad.cli"]
KEYS = {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_aupro"}


def plantad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)


def overrides(*extra: str) -> list[str]:
    return [a for kv in [*TINY, *extra] for a in ("--set", kv)]


def test_train_then_evaluate_writes_metrics(tmp_path, demo_root):
    model_dir, metrics_file, plots = tmp_path / "model", tmp_path / "metrics.json", tmp_path / "plots"
    trained = plantad("train", "--config", PARAMS, "--data", str(demo_root), "--out", str(model_dir),
                      *overrides("train.steps=15"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (model_dir / "model.pt").is_file() and (model_dir / "model.json").is_file()
    evaluated = plantad("evaluate", "--model", str(model_dir), "--data", str(demo_root), "--out", str(metrics_file),
                        "--plots", str(plots))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads(metrics_file.read_text())
    assert KEYS <= set(metrics)
    assert set(metrics["per_category"]) == {"metal", "nut", "weave"}
    assert all(KEYS <= set(v) for v in metrics["per_category"].values())
    assert {"roc.png", "pr.png", "per_category.png", "overlays.png", "roc.csv", "pr.csv"} <= {p.name for p in plots.iterdir()}
    shown = plantad("metrics", str(metrics_file))
    assert shown.returncode == 0, shown.stderr
    first = shown.stdout.split("\n\n")[0]  # then S_D / S_E / joined and the false-alarm rate (test_branch_metrics)
    table = {line.split()[0]: line.split()[1:] for line in first.splitlines()}
    assert table["category"] == ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_aupro"]
    assert float(table["mean"][0]) == round(metrics["image_auroc"], 3)
    assert float(table["nut"][4]) == round(metrics["per_category"]["nut"]["pixel_aupro"], 3)


def test_metrics_of_a_file_that_is_not_metrics_is_named(tmp_path):
    cases = {"list.json": ("[1, 2]", "a JSON object was expected"),
             "partial.json": ('{"image_auroc": 0.9}', "missing image_ap, image_f1_max, pixel_auroc, pixel_aupro"),
             "broken.json": ("{not json", "cannot read metrics file")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        shown = plantad("metrics", str(tmp_path / name))
        assert shown.returncode == 2 and message in shown.stderr and name in shown.stderr, shown.stderr
    assert (tmp_path / "list.json").read_text() == "[1, 2]"  # nothing rewritten


def test_unknown_or_bad_setting_is_named(tmp_path, demo_root):
    bad = plantad("train", "--config", PARAMS, "--data", str(demo_root), "--out", str(tmp_path / "m"),
                  "--set", "train.stepz=3")
    assert bad.returncode == 2 and "unknown key 'train.stepz'" in bad.stderr
    bad = plantad("config", "--config", PARAMS, "--set", "train.lr=-1")
    assert bad.returncode == 2 and "train.lr" in bad.stderr
    assert not (tmp_path / "m").exists()


def test_demo_data_refuses_to_overwrite_and_appends_normals(tmp_path):
    out = tmp_path / "demo"
    small = ["--config", PARAMS, "--set", "demo.n_train=2", "--set", "demo.n_test_good=1", "--set", "demo.n_test_defect=1"]
    assert plantad("demo-data", str(out), *small).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    again = plantad("demo-data", str(out), *small)
    assert again.returncode != 0 and str(out) in again.stderr
    added = plantad("demo-data", str(out), "--add-normal", "2", *small)
    assert added.returncode == 0, added.stderr
    after = {p: p.read_bytes() for p in out.rglob("*.png")}
    assert all(after[p] == b for p, b in before.items())  # nothing stored was changed
    assert len(after) == len(before) + 2 * 3  # two per category
