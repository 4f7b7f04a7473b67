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
from pathlib import Path

import httpx
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
def health_app(ray_local, model_dir):
    from ray import serve

    from plantad.serving.app import build_app

    port = free_port()
    args = {"model_dir": str(model_dir), "ray_actor_options": {"num_cpus": 0.5}, "port": port,
            "drift": {"window_images": 32, "min_images": 32, "every_images": 32}}
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


def test_drift_report_over_a_folder_flags_the_window_after_the_camera_moved(model_dir, normal_images, tmp_path,
                                                                              capsys):
    """`plantad drift report` on a folder with two lines: press-normal (128 normal parts) and
    press-moved (64 normal parts, then 64 through a moved camera). Windows of 64: the moved line's
    second window reports drift, no other window does; the report goes to the version's MLflow run
    and the version is tagged with it. --since leaves out the older images."""
    import mlflow
    from mlflow import MlflowClient

    from plantad.cli import main as cli_main
    from plantad.data.camera_shift import write_line
    from plantad.tracking.pyfunc import log_pyfunc_model
    from plantad.tracking.registry import register_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("drift", artifact_location=str(tmp_path / "artifacts"))
    png = io.BytesIO()
    normal_images[0].save(png, format="PNG")
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=exp) as run:
            info = log_pyfunc_model(model_dir, png.getvalue())
        version = register_version(client, "plantad-drift-test", run.info.run_id, "model", model_id=info.model_id)
    finally:
        mlflow.set_tracking_uri(None)
    folder = tmp_path / "images"
    parts = normal_images[REFERENCE:REFERENCE + 256]
    write_line(parts[:128], folder / "press-normal", None)
    write_line(parts[128:], folder / "press-moved", 64, CameraShift())
    out = tmp_path / "report"
    args = ["drift", "report", "--images", str(folder), "--model", f"models:/plantad-drift-test/{version.version}",
            "--out", str(out), "--set", f"serve.tracking_uri={uri}"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    page = (out / "report.html").read_text()
    rows = dict(re.findall(r"<tr><td>([\w-]+)</td>.*?<td>(\d+ / \d+)</td>", page))
    assert rows == {"press-moved": "1 / 2", "press-normal": "0 / 2"}, rows
    assert (out / "drift_over_time.png").stat().st_size > 10_000
    tag = client.get_model_version("plantad-drift-test", version.version).tags["drift_report"]
    assert tag in printed and tag.startswith(f"runs:/{run.info.run_id}/drift/")
    logged = [f.path for f in client.list_artifacts(run.info.run_id, tag.split("/", 2)[2].rsplit("/", 1)[0])]
    assert any(p.endswith("report.html") for p in logged), logged

    since = "2023-11-14T22:14:20+00:00"  # 1_700_000_000 + 60 s: the last 68 images of each line
    assert cli_main([*args, "--since", since, "--no-log", "--out", str(tmp_path / "since")]) == 0
    page = (tmp_path / "since" / "report.html").read_text()
    assert re.findall(r"<tr><td>([\w-]+)</td><td>(\d+)</td>", page) == [("press-moved", "68"), ("press-normal", "68")]
    assert cli_main([*args, "--since", "yesterday"]) == 2
    assert "--since 'yesterday' is not an ISO 8601 time" in capsys.readouterr().err
