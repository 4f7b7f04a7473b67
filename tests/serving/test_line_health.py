"""Line health end to end: the scoring app on the session's Ray cluster, Debian's Prometheus on
loopback scraping Ray's metrics endpoints with deploy/prometheus's config and alert rules, normal
images on one line and the same kind of parts through a moved camera on another. The drift alert
fires for the moved line only.

The only changes to the deployed config and rules: the service-discovery file lists the session's
cluster's node (in the format Ray writes), scrapes and evaluations run every second, and every
`for:` is 0s (the rules' windows are unchanged). The app tests a line's window every 32 images
instead of 64, to need fewer images.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from infra.fixtures import free_port, wait_for
from plantad.data.camera_shift import CameraShift, shifted_image
from plantad.data.images import ImageTransform

REPO = Path(__file__).resolve().parents[2]
PER_LINE = 160  # 5 tests of 32 images per line
REFERENCE = 160  # held-out normal parts of the reference


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def normal_images(tmp_path_factory) -> list[Image.Image]:
    """Normal demo parts of the three products, shuffled as a line would see them."""
    from plantad.config import DemoConfig
    from plantad.data.demo import generate_demo
    from plantad.data.manifest import scan_dataset

    root = tmp_path_factory.mktemp("health-demo") / "data"
    generate_demo(root, DemoConfig(seed=0, image_size=64, n_train=230, n_test_good=1, n_test_defect=1))
    rows = scan_dataset(root).query("label == 0").sample(frac=1.0, random_state=0)
    return [Image.open(root / p).convert("RGB") for p in rows["path"]]


@pytest.fixture(scope="module")
def model_dir(trained_tiny, normal_images, tmp_path_factory) -> Path:
    """The session's tiny model, calibrated again on 160 held-out normal parts, so that its drift
    reference is as large as a production holdout's."""
    from plantad.models.checkpoint import load_model, save_model
    from plantad.training.calibration import calibrate

    settings, result = trained_tiny
    model, _ = load_model(result.model_path.parent)
    transform = ImageTransform(settings.data.image_size)
    held = [torch.stack([transform(i) for i in normal_images[s:s + 32]]) for s in range(0, REFERENCE, 32)]
    calibrate(model, held, settings.scoring, amp=False)
    out = tmp_path_factory.mktemp("health-model")
    save_model(model, settings, out)
    return out


def prometheus_files(folder: Path, discovery_file: str) -> Path:
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    config["scrape_configs"][0]["file_sd_configs"][0].update({"files": [discovery_file], "refresh_interval": "1s"})
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    rules = (REPO / "deploy" / "prometheus" / "rules.yml").read_text()
    (folder / "rules.yml").write_text(re.sub(r"\bfor: \S+", "for: 0s", rules))
    return folder / "prometheus.yml"


@pytest.fixture(scope="module")
def prometheus(ray_local, tmp_path_factory):
    import ray

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Debian's prometheus is not installed: `apt-get install prometheus` (scripts/test.sh does it)")
    folder = tmp_path_factory.mktemp("prometheus")
    # the file Ray's head writes, in the same format, but for this session's cluster only: Ray's own
    # (under /tmp/ray) is shared by every local cluster on the machine and names the latest one
    nodes = [n for n in ray.nodes() if n["Alive"]]
    discovery = folder / "prom_metrics_service_discovery.json"
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [
        f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in nodes]}]))
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={prometheus_files(folder, str(discovery))}",
                             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url, proc), 60, lambda: f"Prometheus ready at {url}; its log:\n"
                                                        f"{(folder / 'prometheus.log').read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _ready(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"Prometheus exited with {proc.returncode} before it was ready")
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def health_store(tmp_path_factory) -> Path:
    """The health app's serve.store: its part records carry each image's drift coordinates."""
    return tmp_path_factory.mktemp("health-store")


@pytest.fixture(scope="module")
def health_app(ray_local, model_dir, health_store):
    from ray import serve

    from plantad.serving.app import build_app

    port = free_port()
    args = {"model_dir": str(model_dir), "ray_actor_options": {"num_cpus": 0.5}, "port": port,
            "drift": {"window_images": 32, "min_images": 32, "every_images": 32},
            "store": str(health_store), "records": {"enabled": True, "flush_s": 0.5, "images": False}}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="health", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url), 120, f"the health app's /readyz at {url}")
        yield url
    finally:
        serve.shutdown()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def query(prom: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def send(url: str, images: list[Image.Image], line: str) -> None:
    for start in range(0, len(images), 8):
        body = {"images": [png_b64(i) for i in images[start:start + 8]], "line": line}
        response = httpx.post(f"{url}/score", json=body, timeout=60)
        assert response.status_code == 200, response.text


def diagnosis(prom: str, app: str) -> str:
    """What Prometheus scrapes and what the replica says, for a wait's error message."""
    targets = httpx.get(f"{prom}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    scraped = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in targets]
    names = httpx.get(f"{prom}/api/v1/label/__name__/values", timeout=10).json()["data"]
    lines = httpx.get(f"{app}/model", timeout=30).json()["line_health"]["lines"]
    return (f"targets {scraped}; plantad series {[n for n in names if 'plantad' in n]}; "
            f"the replica's line_health {lines}")


def drift_alerts(prom: str) -> list[dict]:
    alerts = httpx.get(f"{prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == "PlantadLineDrift"]


def test_drift_alert_fires_for_the_moved_camera_line_only(health_app, prometheus, normal_images):
    parts = normal_images[REFERENCE:REFERENCE + 2 * PER_LINE]
    assert len(parts) == 2 * PER_LINE
    normal, moved = parts[:PER_LINE], [shifted_image(i, CameraShift()) for i in parts[PER_LINE:]]
    tests = 'ray_plantad_drift_tests_total{application="health"}'
    # one test per line first: the counters appear (increase() needs a sample before the tests it counts)
    for line, images in (("press-normal", normal), ("press-moved", moved)):
        send(health_app, images[:32], line)
    wait_for(lambda: {r["metric"]["line"] for r in query(prometheus, tests)} >= {"press-normal", "press-moved"},
             240, lambda: f"{tests} of both lines in Prometheus; {diagnosis(prometheus, health_app)}")
    for line, images in (("press-normal", normal), ("press-moved", moved)):
        send(health_app, images[32:], line)

    def all_tests_seen():
        got = query(prometheus, f"sum by (line) ({tests})")
        return len(got) == 2 and all(float(r["value"][1]) >= PER_LINE // 32 for r in got)
    wait_for(all_tests_seen, 240, lambda: f"all {PER_LINE // 32} drift tests of each line counted in Prometheus; "
                                          f"{diagnosis(prometheus, health_app)}")
    fired = wait_for(lambda: [a for a in drift_alerts(prometheus) if a["state"] == "firing"], 60,
                     "PlantadLineDrift firing")
    assert [a["labels"]["line"] for a in fired] == ["press-moved"], fired
    assert [a["labels"]["line"] for a in drift_alerts(prometheus)] == ["press-moved"]
    share = {r["metric"]["line"]: float(r["value"][1]) for r in query(prometheus, "plantad:line_drift_test_share:30m")}
    assert share["press-moved"] > 0.5 and share["press-normal"] < 0.5, share
    tests_seen = {r["metric"]["line"]: float(r["value"][1]) for r in query(prometheus, "plantad:line_drift_tests:30m")}
    assert tests_seen["press-normal"] >= 3, tests_seen  # enough tests for the rule to judge the normal line

    # the labels the other rules group by are there, and /model shows both lines' last tests
    assert query(prometheus, 'ray_serve_deployment_replica_healthy{application="health",deployment="ScoringServer"}')
    assert query(prometheus, 'ray_plantad_model_version{application="health"}')
    swap = query(prometheus, 'ray_plantad_swap_error{application="health"}')  # from Serve's health check
    assert [float(r["value"][1]) for r in swap] == [0.0], swap
    health = httpx.get(f"{health_app}/model", timeout=30).json()["line_health"]
    assert health["reference"]["images"] == REFERENCE
    lines = health["lines"]
    assert lines["press-moved"]["last_test"]["drifted"] and not lines["press-normal"]["last_test"]["drifted"]
    assert lines["press-normal"]["window_images"] == 32


@dataclass
class DriftRegistry:
    uri: str
    client: Any
    run_id: str
    version: str  # model_dir, registered as plantad-drift-test


@pytest.fixture(scope="module")
def drift_registry(model_dir, normal_images, tmp_path_factory) -> DriftRegistry:
    import mlflow
    from mlflow import MlflowClient

    from plantad.tracking.pyfunc import log_pyfunc_model
    from plantad.tracking.registry import register_version

    root = tmp_path_factory.mktemp("drift-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("drift", artifact_location=str(root / "artifacts"))
    png = io.BytesIO()
    normal_images[0].save(png, format="PNG")
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=exp) as run:
            info = log_pyfunc_model(model_dir, png.getvalue())
        version = register_version(client, "plantad-drift-test", run.info.run_id, "model", model_id=info.model_id)
    finally:
        mlflow.set_tracking_uri(None)
    return DriftRegistry(uri, client, run.info.run_id, str(version.version))


def test_drift_report_over_a_folder_flags_the_window_after_the_camera_moved(drift_registry, normal_images, tmp_path,
                                                                              capsys):
    """`plantad drift report` on a folder with two lines: press-normal (128 normal parts) and
    press-moved (64 normal parts, then 64 through a moved camera). Windows of 64: the moved line's
    second window reports drift, no other window does; the report goes to the version's MLflow run
    and the version is tagged with it. --since leaves out the older images."""
    from plantad.cli import main as cli_main
    from plantad.data.camera_shift import write_line

    uri, client, version = drift_registry.uri, drift_registry.client, drift_registry.version
    folder = tmp_path / "images"
    parts = normal_images[REFERENCE:REFERENCE + 256]
    write_line(parts[:128], folder / "press-normal", None)
    write_line(parts[128:], folder / "press-moved", 64, CameraShift())
    out = tmp_path / "report"
    args = ["drift", "report", "--images", str(folder), "--model", f"models:/plantad-drift-test/{version}",
            "--out", str(out), "--set", f"serve.tracking_uri={uri}"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    page = (out / "report.html").read_text()
    rows = dict(re.findall(r"<tr><td>([\w-]+)</td>.*?<td>(\d+ / \d+)</td>", page))
    assert rows == {"press-moved": "1 / 2", "press-normal": "0 / 2"}, rows
    assert (out / "drift_over_time.png").stat().st_size > 10_000
    tag = client.get_model_version("plantad-drift-test", version).tags["drift_report"]
    assert tag in printed and tag.startswith(f"runs:/{drift_registry.run_id}/drift/")
    logged = [f.path for f in client.list_artifacts(drift_registry.run_id, tag.split("/", 2)[2].rsplit("/", 1)[0])]
    assert any(p.endswith("report.html") for p in logged), logged

    since = "2023-11-14T22:14:20+00:00"  # 1_700_000_000 + 60 s: the last 68 images of each line
    assert cli_main([*args, "--since", since, "--no-log", "--out", str(tmp_path / "since")]) == 0
    page = (tmp_path / "since" / "report.html").read_text()
    assert re.findall(r"<tr><td>([\w-]+)</td><td>(\d+)</td>", page) == [("press-moved", "68"), ("press-normal", "68")]
    assert cli_main([*args, "--since", "yesterday"]) == 2
    assert "--since 'yesterday' is not an ISO 8601 time" in capsys.readouterr().err


def write_part(store: Path, name: str, rows: list[dict], schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = store / "records" / "2026-12-06"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name)


def test_records_carry_the_window_coordinates_and_the_records_report_flags_the_moved_line(
        health_app, health_store, model_dir, drift_registry, normal_images, tmp_path, capsys):
    """The health app records each part with its drift coordinates. On two lines of its own (64
    normal parts; 64 through a moved camera), the coordinates in the records of each line's last 32
    parts give exactly the AUC and p-value of the replica's last test of that line (/model): they are
    what the window held. `drift report --records` (windows of 64) flags the moved line only.
    A folder-served app records no version, so for the MLflow path its rows are copied relabelled as
    the registered copy of the same folder, beside older rows of another version and a part without
    the coordinates column (an older plantad's): the report leaves both out, says so, and is logged
    on that version's run. Bad input is refused, naming the problem."""
    import pyarrow as pa

    from plantad.cli import main as cli_main
    from plantad.config import S3Config
    from plantad.evaluation.drift import window_drift
    from plantad.serving.predictor import Predictor
    from plantad.serving.records import SCHEMA, read_records
    from plantad.storage import open_location

    parts = normal_images[REFERENCE + 2 * PER_LINE:REFERENCE + 2 * PER_LINE + 128]
    assert len(parts) == 128
    lines = {"rec-normal": parts[:64], "rec-moved": [shifted_image(i, CameraShift()) for i in parts[64:]]}
    started, last_request = time.time(), {}
    for line, images in lines.items():
        send(health_app, images[:56], line)
        last_request[line] = time.time()
        send(health_app, images[56:], line)  # the 64th part: the line's second test is due

    def tested() -> dict | None:
        got = httpx.get(f"{health_app}/model", timeout=30).json()["line_health"]["lines"]
        done = all((got.get(line) or {}).get("last_test") and got[line]["last_test"]["at"] >= last_request[line]
                   for line in lines)
        return got if done else None
    health = wait_for(tested, 60, "the second drift test of both record lines on /model")
    loc = open_location(str(health_store), S3Config())
    rows = wait_for(lambda: (r := [x for x in read_records(loc) if x["time"] >= started]) and len(r) == 128 and r,
                    30, "the 128 records flushed")
    reference = Predictor.load(str(model_dir)).drift_reference
    for line in lines:
        mine = [r for r in rows if r["line"] == line]
        vectors = np.array([r["drift"] for r in mine], dtype=np.float32)
        assert vectors.shape == (64, reference.projection.shape[1])
        # the second test's window: the last 32 (the first one's, should it have run late: the first 32)
        found = [window_drift(reference, vectors[sl], np.array([r["probability"] for r in mine[sl]]),
                              np.zeros(32, bool), 0.01, 0.0) for sl in (slice(32, 64), slice(0, 32))]
        last = health[line]["last_test"]
        assert (last["auc"], last["p_value"]) in [(w.auc, w.p_value) for w in found], (line, last, found)

    table = re.compile(r"<tr><td>([\w-]+)</td><td>(\d+)</td>.*?<td>(DRIFT|ok)</td><td>(\d+ / \d+)</td>")
    since = datetime.fromtimestamp(started).astimezone().isoformat()
    direct = ["drift", "report", "--records", str(health_store), "--since", since, "--model", str(model_dir)]
    assert cli_main([*direct, "--no-log", "--out", str(tmp_path / "direct")]) == 0
    page = (tmp_path / "direct" / "report.html").read_text()
    assert table.findall(page) == [("rec-moved", "64", "DRIFT", "1 / 1"), ("rec-normal", "64", "ok", "0 / 1")]

    store, version = tmp_path / "store", drift_registry.version
    write_part(store, "1-old-version.parquet", [{**r, "model_version": "7", "time": r["time"] - 3600}
                                                for r in rows[:5]], SCHEMA)
    old_schema = pa.schema([f for f in SCHEMA if f.name != "drift"])
    old = [{**{k: v for k, v in r.items() if k != "drift"}, "model_version": version, "time": r["time"] - 1800}
           for r in rows[:3]]
    write_part(store, "2-older-plantad.parquet", old, old_schema)
    write_part(store, "3-new.parquet", [{**r, "model_version": version} for r in rows], SCHEMA)
    registry = ["--set", f"serve.tracking_uri={drift_registry.uri}", "--set", "serve.model_name=plantad-drift-test"]
    capsys.readouterr()
    assert cli_main(["drift", "report", "--records", str(store), *registry, "--out", str(tmp_path / "logged")]) == 0
    printed = capsys.readouterr().out
    assert (f"128 scored-part records in {store}, scored by model version {version}; left out: 5 rows of other "
            "versions, 3 rows without drift coordinates") in printed
    page = (tmp_path / "logged" / "report.html").read_text()
    assert table.findall(page) == [("rec-moved", "64", "DRIFT", "1 / 1"), ("rec-normal", "64", "ok", "0 / 1")]
    tag = drift_registry.client.get_model_version("plantad-drift-test", version).tags["drift_report"]
    assert tag in printed and tag.startswith(f"runs:/{drift_registry.run_id}/drift/")

    only_old = tmp_path / "only-old"
    write_part(only_old, "1.parquet", old, old_schema)
    refused = {
        ("--records", str(store), "--version", "42"): f"no records of model version 42 in {store}; the records "
                                                      f"name versions {version}, 7",
        ("--records", str(store), "--version", "7"): "plantad-drift-test has no version 7",
        ("--records", str(store), "--since", "2100-01-01T00:00"): f"no scored-part records in {store}/records since",
        ("--records", str(tmp_path / "nowhere")): f"--records {tmp_path / 'nowhere'} is not a folder",
        ("--records", str(only_old)): f"none of the 3 records of model version {version} in {only_old} carry drift",
        ("--records", str(health_store), "--since", since): "the records were scored by a model folder",
        ("--images", str(tmp_path), "--version", "1"): "--version picks the records' rows",
    }
    for extra, message in refused.items():
        assert cli_main(["drift", "report", *extra, *registry, "--no-log", "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):
        cli_main(["drift", "report", "--records", str(store), "--images", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err
