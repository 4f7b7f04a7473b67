"""The Ray Serve app end to end on the session's Ray cluster: scores over HTTP equal score_batch,
promotion swaps without failed requests, a broken version is refused and reported, hostile
uploads get 4xx, API keys, webhooks, overload 503, metrics and the command-line client."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from corpus import converted_cases, malformed_cases
from infra.fixtures import wait_for
from plantad.cli import main as cli_main
from plantad.client import ScoringClient
from plantad.data.images import ImageTransform, decode_image_bytes
from plantad.models.checkpoint import load_model
from plantad.scoring import score_batch
from plantad.serving.security import webhook_signature
from plantad.tracking.registry import CHAMPION, set_alias

pytestmark = pytest.mark.e2e
FIELDS = ["probability", "p_local", "p_semantic", "local_score", "semantic_score"]


@pytest.fixture(scope="module")
def pngs(demo_root, demo_manifest) -> list[bytes]:
    rows = demo_manifest[demo_manifest["split"] == "test"].head(6)
    return [(demo_root / p).read_bytes() for p in rows["path"]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_http_scores_equal_in_process_score_batch(served, trained_tiny, pngs):
    settings, result = trained_tiny
    model, _ = load_model(result.model_path)
    x = torch.stack([ImageTransform(settings.data.image_size)(decode_image_bytes(b)) for b in pngs])
    ref = score_batch(model, x, settings.scoring)
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
    native = httpx.post(f"{served.url}/score", files=files, params={"heatmap": "true"}, timeout=60).json()
    as_json = httpx.post(f"{served.url}/score", json={"images": [b64(b) for b in pngs]}, timeout=60).json()
    v2 = httpx.post(f"{served.url}/v2/models/plantad-serve-test/infer", timeout=60, json={
        "id": "r1", "inputs": [{"name": "image", "shape": [len(pngs)], "datatype": "BYTES",
                                "data": [b64(b) for b in pngs]}]}).json()
    for answer in (native, as_json):
        assert answer["scored"] == len(pngs) and answer["model"]["version"] == served.registry.good[0]
        for field in FIELDS:
            got = [r[field] for r in answer["results"]]
            np.testing.assert_allclose(got, getattr(ref, field).numpy(), rtol=1e-4, atol=1e-6, err_msg=field)
        assert [r["is_anomalous"] for r in answer["results"]] == ref.is_anomalous.tolist()
        assert all(r["threshold"] == pytest.approx(float(model.noisy_or.threshold)) for r in answer["results"])
    outputs = {o["name"]: o for o in v2["outputs"]}
    assert v2["model_version"] == served.registry.good[0] and v2["id"] == "r1"
    assert v2["parameters"]["runtime"] == "torch"  # what scored: the torch forward, no exported graph
    np.testing.assert_allclose(outputs["probability"]["data"], ref.probability.numpy(), rtol=1e-4, atol=1e-6)
    assert outputs["probability"]["datatype"] == "FP32" and outputs["is_anomalous"]["datatype"] == "BOOL"
    first = native["results"][0]
    heat = Image.open(io.BytesIO(base64.b64decode(first["heatmap_png"])))
    assert heat.size == (first["width"], first["height"])
    assert 0 <= first["box"]["x0"] < first["box"]["x1"] <= first["width"]
    forced = httpx.post(f"{served.url}/score", json={"images": [b64(pngs[0])], "threshold": 0.0}).json()
    assert forced["results"][0]["is_anomalous"] and forced["results"][0]["threshold"] == 0.0


def test_probes_model_info_docs_and_v2_metadata(served):
    assert httpx.get(f"{served.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{served.url}/readyz").json()["ready"] is True
    info = httpx.get(f"{served.url}/model").json()
    assert info["name"] == "plantad-serve-test" and info["alias"] == "champion"
    assert info["metrics"] == {"image_auroc": 0.9} and info["teacher"] and info["loaded_at"] > 0
    assert info["data_version"] == {"data_dvc_md5": "md5-0", "git_commit": "c0ffee"}
    assert info["last_swap_error"] is None and info["version"] == served.registry.good[0]
    assert "/score" in httpx.get(f"{served.url}/openapi.json").json()["paths"]
    assert "swagger" in httpx.get(f"{served.url}/docs").text.lower()
    assert httpx.get(f"{served.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{served.url}/v2/health/ready").status_code == 200
    meta = httpx.get(f"{served.url}/v2/models/plantad-serve-test").json()
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert meta["platform"] == "pytorch" and meta["parameters"]["runtime"] == "torch"
    unknown = httpx.get(f"{served.url}/v2/models/other")
    assert unknown.status_code == 400 and "unknown model 'other'" in unknown.json()["error"]


def test_malformed_corpus_gets_only_4xx_and_others_still_scored(served, pngs):
    cases = malformed_cases(seed=0)
    assert len(cases) >= 200
    for start in range(0, len(cases), 50):  # each request: one good image among 50 hostile ones
        chunk = cases[start:start + 50]
        files = [("files", ("good.png", pngs[0], "image/png"))] + [("files", (n, d, "image/png")) for n, d, _ in chunk]
        r = httpx.post(f"{served.url}/score", files=files, timeout=120)
        assert r.status_code == 200, r.text
        good, *bad = r.json()["results"]
        assert good["status"] == 200 and 0.0 <= good["probability"] <= 1.0
        for (name, _, expected), entry in zip(chunk, bad):
            assert (entry["status"], entry["name"]) == (expected, name), entry
            assert name in entry["error"] or entry["status"] == 413, entry
    only_bad = httpx.post(f"{served.url}/score", files=[("files", ("x.png", b"nope", "image/png"))])
    assert only_bad.status_code == 400 and only_bad.json()["results"][0]["status"] == 400
    assert httpx.get(f"{served.url}/healthz").status_code == 200


@pytest.mark.parametrize("kind", ["empty", "json", "json-list", "keys", "b64", "ctype", "multipart", "length",
                                  "stream", "count", "v2-dtype", "v2-shape", "v2-b64", "v2-json", "line-json",
                                  "line-form", "line-v2", "v2-nan", "v2-text-threshold", "json-inf"])
def test_bad_requests_get_4xx_json_errors(served, pngs, kind):
    url, v2 = f"{served.url}/score", f"{served.url}/v2/models/plantad-serve-test/infer"
    big = b"x" * 2_100_000

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    v2_one = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(pngs[0])]}]}
    calls = {
        "empty": lambda: httpx.post(url, content=b"", headers={"content-type": "application/json"}),
        "json": lambda: httpx.post(url, content=b'{"images": [', headers={"content-type": "application/json"}),
        "json-list": lambda: httpx.post(url, json=[1, 2]),
        "keys": lambda: httpx.post(url, json={"imgs": []}),
        "b64": lambda: httpx.post(url, json={"images": ["***not base64***"]}),
        "ctype": lambda: httpx.post(url, content=pngs[0], headers={"content-type": "image/png"}),
        "multipart": lambda: httpx.post(url, content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}),
        "length": lambda: httpx.post(url, content=big, headers={"content-type": "application/json"}),
        "stream": lambda: httpx.post(url, content=chunks(), headers={"content-type": "application/json"}),
        "count": lambda: httpx.post(url, json={"images": [b64(pngs[0])] * 65}),
        "v2-dtype": lambda: httpx.post(v2, json={"inputs": [{"name": "image", "shape": [1], "datatype": "FP32",
                                                             "data": [1.0]}]}),
        "v2-shape": lambda: httpx.post(v2, json={"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                                             "data": [b64(pngs[0])]}]}),
        "v2-b64": lambda: httpx.post(v2, json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                           "data": ["%%%"]}]}),
        "v2-json": lambda: httpx.post(v2, content=b"{", headers={"content-type": "application/json"}),
        "line-json": lambda: httpx.post(url, json={"images": [b64(pngs[0])], "line": "press 3; drop"}),
        "line-form": lambda: httpx.post(url, files=[("files", ("a.png", pngs[0], "image/png"))],
                                        params={"line": "x" * 65}),
        "line-v2": lambda: httpx.post(v2, json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                            "data": [b64(pngs[0])]}], "parameters": {"line": 7}}),
        "v2-nan": lambda: httpx.post(v2, content=json.dumps({**v2_one, "parameters": {"threshold": float("nan")}}),
                                     headers={"content-type": "application/json"}),  # JSON's NaN literal
        "v2-text-threshold": lambda: httpx.post(v2, json={**v2_one, "parameters": {"threshold": "0.5"}}),
        "json-inf": lambda: httpx.post(url, content=f'{{"images": ["{b64(pngs[0])}"], "threshold": 1e999}}',
                                       headers={"content-type": "application/json"}),
    }
    expected = {"length": 413, "stream": 413, "count": 413, "ctype": 415}.get(kind, 400)
    r = calls[kind]()
    assert r.status_code == expected, r.text
    error = r.json()["error"] if "error" in r.json() else r.json()["results"][0]["error"]
    assert error
    if kind.startswith("line"):
        assert "is not a line name" in error, error
    if kind in ("v2-nan", "v2-text-threshold", "json-inf"):
        assert "threshold" in error and "is not" in error, error


def test_converted_images_say_so(served):
    cases = converted_cases()
    files = [("files", (name, data, "image/png")) for name, data, _ in cases]
    results = httpx.post(f"{served.url}/score", files=files, timeout=60).json()["results"]
    for (_, _, converted), entry in zip(cases, results):
        assert entry["status"] == 200, entry
        assert entry["converted"] == converted or (converted.startswith("converted from I;16")
                                                   and entry["converted"].startswith("converted from I"))


async def _score_loop(url: str, png: bytes, stop: asyncio.Event, seen: list[tuple[int, str | None]]) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            r = await client.post(f"{url}/score", json={"images": [b64(png)]})
            seen.append((r.status_code, r.json()["results"][0].get("model_version") if r.status_code == 200 else None))


async def _load_during(url: str, png: bytes, action, until) -> list[tuple[int, str | None]]:
    """4 concurrent clients score in a loop while `action` runs, until `until(seen)` holds (60 s at most)."""
    stop, seen = asyncio.Event(), []
    tasks = [asyncio.create_task(_score_loop(url, png, stop, seen)) for _ in range(4)]
    await asyncio.sleep(1.0)
    await asyncio.to_thread(action)
    deadline = time.monotonic() + 60
    while not until(seen) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*tasks)
    return seen


def test_champion_moves_without_failed_requests_and_a_broken_version_is_refused(served, pngs):
    reg = served.registry
    old, new = reg.good

    def switched(seen):
        return sum(1 for _, v in seen[-8:] if v == new) == 8

    seen = asyncio.run(_load_during(served.url, pngs[0], lambda: set_alias(reg.client, "plantad-serve-test",
                                                                           CHAMPION, new), switched))
    statuses = {s for s, _ in seen}
    versions = [v for _, v in seen]
    assert statuses == {200}, f"failed requests during the swap: {statuses}"
    assert versions[0] == old and switched(seen), versions
    assert len(seen) >= 20

    seen = asyncio.run(_load_during(served.url, pngs[0], lambda: set_alias(reg.client, "plantad-serve-test",
                                                                           CHAMPION, reg.broken),
                                    lambda _: _swap_error(served.url) is not None))
    error = _swap_error(served.url)
    assert error is not None and error["version"] == reg.broken and "model.pt" in error["error"]
    assert {s for s, _ in seen} == {200} and {v for _, v in seen} == {new}
    assert httpx.get(f"{served.url}/model").json()["version"] == new
    set_alias(reg.client, "plantad-serve-test", CHAMPION, new)


def _swap_error(url: str):
    return httpx.get(f"{url}/model").json()["last_swap_error"]


def test_api_keys_guard_every_route_but_liveness(served, pngs):
    url, auth = served.strict_url, {"Authorization": f"Bearer {served.api_key}"}
    body = {"images": [b64(pngs[0])]}
    for path in ("/model", "/readyz", "/docs", "/openapi.json", "/v2", "/v2/health/ready"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 401 and "API key" in r.json()["error"], path
        assert httpx.get(f"{url}{path}", headers=auth).status_code == 200, path
    assert httpx.post(f"{url}/score", json=body).status_code == 401
    assert httpx.post(f"{url}/score", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{url}/score", json=body, headers=auth).status_code == 200
    assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/v2/health/live").status_code == 200


def test_signed_webhook_triggers_an_immediate_swap(served):
    url, auth, reg = served.strict_url, {"Authorization": f"Bearer {served.api_key}"}, served.registry
    assert httpx.get(f"{url}/model", headers=auth).json()["version"] == reg.good[0]
    set_alias(reg.client, "plantad-serve-test", "staging", reg.good[1])  # the replica polls only hourly
    payload = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "now",
                          "data": {"name": "plantad-serve-test", "alias": "staging", "version": reg.good[1]}}).encode()
    stamp = str(int(time.time()))
    headers = {"X-MLflow-Delivery-Id": "d-1", "X-MLflow-Timestamp": stamp, "content-type": "application/json"}
    forged = httpx.post(f"{url}/webhooks/mlflow", content=payload,
                        headers={**headers, "X-MLflow-Signature": webhook_signature("wrong", "d-1", stamp, payload)})
    assert forged.status_code == 401 and "signature" in forged.json()["error"]
    time.sleep(1.0)
    assert httpx.get(f"{url}/model", headers=auth).json()["version"] == reg.good[0]
    signed = webhook_signature(served.webhook_secret, "d-1", stamp, payload)
    r = httpx.post(f"{url}/webhooks/mlflow", content=payload, headers={**headers, "X-MLflow-Signature": signed})
    assert r.status_code == 200 and r.json() == {"check": "scheduled"}
    wait_for(lambda: httpx.get(f"{url}/model", headers=auth).json()["version"] == reg.good[1], 60, "webhook swap")


def test_overload_beyond_the_queue_gets_503(served, pngs):
    auth = {"Authorization": f"Bearer {served.api_key}"}
    files = [("files", (f"{i}.png", pngs[i % len(pngs)], "image/png")) for i in range(16)]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(*[client.post(f"{served.strict_url}/score", files=files, headers=auth,
                                                    params={"heatmap": "true"}) for _ in range(12)])
        return [r.status_code for r in rs]

    statuses = asyncio.run(burst())
    assert set(statuses) == {200, 503}, statuses  # max_ongoing_requests=1, max_queued_requests=1
    assert httpx.get(f"{served.strict_url}/readyz", headers=auth).status_code == 200


def test_score_online_cli_prints_one_line_per_image(served, pngs, tmp_path, capsys):
    paths = []
    for i, data in enumerate([pngs[0], b"not an image"]):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(data)
    code = cli_main(["score-online", *map(str, paths), "--url", served.url, "--heatmap", str(tmp_path / "heat")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # one image could not be scored
    assert lines[0]["status"] == 200 and lines[0]["model_version"] and (tmp_path / "heat" / "img0_heatmap.png").is_file()
    assert lines[1]["status"] == 400 and "img1.png" in lines[1]["error"]
    assert cli_main(["score-online", str(paths[1]), "--url", served.url]) == 2  # nothing scored: an error
    assert "HTTP 400: cannot decode image img1.png" in capsys.readouterr().err
    assert cli_main(["score-online", str(paths[0]), "--url", served.url, "--line", "line 7"]) == 2
    assert "form line 'line 7' is not a line name" in capsys.readouterr().err


def test_prometheus_metrics_reach_the_ray_metrics_endpoint(served, pngs):
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    # this test's own traffic: one scored request and one refused with 413 (too many images), and one
    # request per way of naming a line: JSON, multipart query and v2 parameters
    assert httpx.post(f"{served.url}/score", json={"images": [b64(pngs[0])]}, timeout=60).status_code == 200
    assert httpx.post(f"{served.url}/score", json={"images": [b64(pngs[0])] * 65}, timeout=60).status_code == 413
    assert httpx.post(f"{served.url}/score", json={"images": [b64(pngs[0])], "line": "press-3"},
                      timeout=60).status_code == 200
    with ScoringClient(served.url) as client:  # multipart, the line in the query
        assert client.score([pngs[1]], line="weave.L2")["scored"] == 1
    v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(pngs[2])]}],
          "parameters": {"line": "nut:7"}}
    assert httpx.post(f"{served.url}/v2/models/plantad-serve-test/infer", json=v2, timeout=60).status_code == 200

    def scraped():  # metrics reach the endpoint in periodic exports: wait for both statuses
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        names = ("plantad_requests", "plantad_request_latency_ms", "plantad_batch_images", "plantad_probability",
                 "plantad_decisions", "plantad_model_version", "plantad_image_errors")
        requests = [line for line in text.splitlines()
                    if line.startswith("ray_plantad_requests") and 'route="score"' in line]
        statuses = all(any(f'status="{code}"' in line for line in requests) for code in (200, 413))
        decisions = [line for line in text.splitlines() if line.startswith("ray_plantad_decisions")]
        lines = all(any(f'line="{name}"' in d for d in decisions)
                    for name in ("press-3", "weave.L2", "nut:7", "unspecified"))
        return text if statuses and lines and all(n in text for n in names) else None

    wait_for(scraped, 90, f"plantad request metrics with status 200 and 413, and decisions of every line, at "
                          f"127.0.0.1:{port}/metrics")


def test_replicas_run_serves_throughput_mode_behind_the_one_proxy_port(served):
    """plantad.cluster.SERVE_ENV reaches the replicas of a cluster plantad starts, no replica
    opens an HTTP port of its own (direct ingress stays off: clients keep Serve's proxy address),
    and what a replica listens on is on loopback."""
    import psutil
    from ray.serve._private.constants import (RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT as HIGH,
                                              RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT as LOW)

    from plantad.cluster import SERVE_ENV

    def loopback(ip: str) -> bool:  # a dual-stack socket shows 127.0.0.1 as ::ffff:127.0.0.1
        addr = ipaddress.ip_address(ip)
        return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback

    def command(proc: psutil.Process) -> str:
        try:
            return " ".join(proc.cmdline())
        except psutil.Error:  # a worker that exited meanwhile
            return ""

    # the session's cluster was started by this process: its replicas are among its descendants
    replicas = [p for p in psutil.Process().children(recursive=True) if command(p).startswith("ray::ServeReplica")]
    assert replicas, "no Serve replica process of the session's cluster found"
    for proc in replicas:
        env = proc.environ()
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV
        listening = [c.laddr for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert not [a.port for a in listening if LOW <= a.port <= HIGH], listening
        # Serve's inter-deployment gRPC server, rebound from [::] to the node IP (serving/security.py)
        assert listening and all(loopback(a.ip) for a in listening), listening
    assert httpx.get(f"{served.url}/healthz", timeout=30).status_code == 200
