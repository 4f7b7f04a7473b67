"""The rollout on the session's Ray cluster: one application, two replicas, versions whose weights
differ, every alias move announced by a signed MLflow webhook (the controller's poll is hourly).

Promotion under a concurrent request loop, the golden check on every replica, a canary that flags
every image rolled back on its own line only, and the shadow's comparison written to the registry.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from infra.fixtures import free_port, wait_for
from plantad.serving.predictor import Predictor
from plantad.serving.security import webhook_signature
from plantad.tracking.registry import CHAMPION, promotion_decision, set_alias
from rollout_versions import versions  # noqa: F401  (module fixture)

CANARY_LINE, OTHER_LINE = "press-3", "press-1"
REPO = Path(__file__).resolve().parents[2]


def config_file_args() -> dict:
    """deploy/serve_config.yaml's args: what `serve run` would pass to build_app."""
    return dict(yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())["applications"][0]["args"])


@dataclass
class App:
    url: str
    secret: str


@pytest.fixture(scope="module")
def normal_pngs(demo_root, demo_manifest) -> list[bytes]:
    rows = demo_manifest[(demo_manifest["split"] == "test") & (demo_manifest["label"] == 0)].head(4)
    return [(demo_root / p).read_bytes() for p in rows["path"]]


@pytest.fixture(scope="module")
def app(ray_local, versions, tmp_path_factory) -> App:
    from ray import serve

    from plantad.serving.app import build_app

    secret = secrets.token_hex(16)
    secret_file = tmp_path_factory.mktemp("rollout-secret") / "webhook"
    secret_file.write_text(secret)
    set_alias(versions.client, versions.name, CHAMPION, versions.a)
    port = free_port()
    args = {**config_file_args(), "model_name": versions.name, "tracking_uri": versions.uri, "num_replicas": 2,
            "ray_actor_options": {"num_cpus": 0.25}, "alias_poll_s": 3600.0, "port": port,
            "webhook_secret_file": str(secret_file), "drift": {"enabled": False},
            "rollout": {"follow_s": 0.25, "shadow": {"alias": "challenger", "share": 1.0},
                        "canary": {"alias": "canary", "lines": [CANARY_LINE], "min_images": 20, "margin": 0.05,
                                   "alpha": 0.01}}}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="rollout", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: len(rollout(url)["replicas"]) == 2 if ready(url) else False, 300, "two replicas reporting")
        yield App(url, secret)
    finally:
        serve.shutdown()


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def rollout(url: str) -> dict:
    return httpx.get(f"{url}/rollout", timeout=30).json()


def move(app: App, versions, alias: str, version: str) -> float:
    """What a person does in the MLflow UI, and the webhook MLflow then sends; returns when it was sent."""
    set_alias(versions.client, versions.name, alias, version)
    payload = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "now",
                          "data": {"name": versions.name, "alias": alias, "version": version}}).encode()
    stamp, delivery = str(int(time.time())), secrets.token_hex(4)
    headers = {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp, "content-type": "application/json",
               "X-MLflow-Signature": webhook_signature(app.secret, delivery, stamp, payload)}
    sent = time.monotonic()
    r = httpx.post(f"{app.url}/webhooks/mlflow", content=payload, headers=headers, timeout=30)
    assert r.status_code == 200 and r.json() == {"check": "scheduled"}, r.text
    return sent


def score(url: str, png: bytes, line: str) -> dict:
    r = httpx.post(f"{url}/score", files=[("files", ("x.png", png, "image/png"))], params={"line": line}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@dataclass
class Loop:
    """Clients scoring in a loop; every answer kept (version, probability) and every failure."""

    url: str
    pngs: list[bytes]
    answers: list[tuple[float, str, float, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def client(self, k: int) -> None:
        with httpx.Client(timeout=60) as http:
            i = k
            while not self.stop.is_set():
                png = self.pngs[i % len(self.pngs)]
                try:
                    r = http.post(f"{self.url}/score", files=[("files", ("x.png", png, "image/png"))],
                                  params={"line": OTHER_LINE})
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        d = r.json()
                        self.answers.append((time.monotonic(), d["model"]["version"],
                                             d["results"][0]["probability"], i % len(self.pngs)))
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                i += 1

    def run(self, clients: int = 3) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.client, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        return threads


def serving(url: str) -> set[str]:
    return {r["serving"] for r in rollout(url)["replicas"].values()}


def test_both_replicas_follow_a_promotion_under_load_and_answer_with_the_new_weights(app, versions, normal_pngs):
    expected = {v: Predictor.load(f"models:/{versions.name}/{v}", versions.uri, device="cpu")
                .score([Image.open(__import__("io").BytesIO(p)).convert("RGB") for p in normal_pngs])
                for v in (versions.a, versions.b)}
    assert all(abs(x.probability - y.probability) > 1e-4 for x, y in zip(expected[versions.a], expected[versions.b]))
    loop = Loop(app.url, normal_pngs)
    threads = loop.run()
    try:
        wait_for(lambda: len(loop.answers) >= 6, 60, "answers from v-a")
        sent = move(app, versions, CHAMPION, versions.b)
        wait_for(lambda: rollout(app.url)["declared"]["champion"] == versions.b, 5, "the controller's declaration")
        declared_s = time.monotonic() - sent
        epoch = rollout(app.url)["declared"]["epoch"]
        wait_for(lambda: all(r["epoch"] >= epoch for r in rollout(app.url)["replicas"].values()), 5,
                 "both replicas taking the new declaration (loading v-b)")
        followed_s = time.monotonic() - sent
        wait_for(lambda: serving(app.url) == {versions.b}, 120, "both replicas serving v-b")
        swapped = time.monotonic()
        wait_for(lambda: sum(1 for a in loop.answers if a[0] > swapped) >= 6, 60, "answers after the swap")
        # back to v-a, still loaded as the previous champion: served within 2 s of the move
        sent_back = move(app, versions, CHAMPION, versions.a)
        wait_for(lambda: serving(app.url) == {versions.a}, 10, "both replicas back on v-a")
        back_s = time.monotonic() - sent_back
    finally:
        loop.stop.set()
        for t in threads:
            t.join(60)
    assert loop.failures == [], loop.failures[:3]
    assert declared_s < 1.0, f"the webhook reached the controller's declaration in {declared_s:.2f} s"
    assert followed_s < 1.0, f"both replicas took the declaration {followed_s:.2f} s after the webhook"
    assert back_s < 2.0, f"moving back to the warm previous champion took {back_s:.2f} s"
    after = [a for a in loop.answers if swapped < a[0] < sent_back]
    assert after and all(v == versions.b for _, v, _, _ in after)
    for _, v, p, i in loop.answers:  # every answer is the in-process score of the version it names
        assert abs(p - expected[v][i].probability) < 1e-5, (v, i, p, expected[v][i].probability)


def test_a_version_whose_golden_outputs_do_not_match_is_refused_on_every_replica(app, versions, normal_pngs):
    move(app, versions, CHAMPION, versions.bad)
    try:
        def refused() -> bool:
            replicas = rollout(app.url)["replicas"].values()
            return len(replicas) == 2 and all((r["last_error"] or {}).get("version") == versions.bad for r in replicas)
        wait_for(refused, 120, "both replicas refusing the version")
        for r in rollout(app.url)["replicas"].values():
            assert r["serving"] == versions.a and "golden.png probability" in r["last_error"]["error"]
        assert score(app.url, normal_pngs[0], OTHER_LINE)["model"]["version"] == versions.a
    finally:
        move(app, versions, CHAMPION, versions.a)


def test_a_canary_that_flags_every_image_is_rolled_back_and_other_lines_never_see_it(app, versions, normal_pngs):
    move(app, versions, "canary", versions.flagging)
    wait_for(lambda: {r["canary"] for r in rollout(app.url)["replicas"].values()} == {versions.flagging}, 120,
             "both replicas holding the canary")
    seen: dict[str, set[str]] = {CANARY_LINE: set(), OTHER_LINE: set()}
    sent = 0
    for i in range(200):
        for line in (CANARY_LINE, OTHER_LINE):
            seen[line].add(score(app.url, normal_pngs[i % len(normal_pngs)], line)["model"]["version"])
        sent += 1
        if versions.flagging in rollout(app.url)["canary_ended"]:
            break
    ended = rollout(app.url)["canary_ended"]
    assert versions.flagging in ended, f"no rollback after {sent} requests per line"
    assert sent <= 60, f"the rollback took {sent} requests per line"
    assert versions.flagging in seen[CANARY_LINE] and seen[OTHER_LINE] == {versions.a}
    tags = versions.client.get_model_version(versions.name, versions.flagging).tags
    assert tags["rollout.canary"] == "rolled back" and "reject rate" in tags["rollout.canary_reason"]
    assert json.loads(tags["rollout.canary_figures"])["canary_rate"] == 1.0
    wait_for(lambda: score(app.url, normal_pngs[0], CANARY_LINE)["model"]["version"] == versions.a, 10,
             "the canary line back on the champion")
    decision = promotion_decision(versions.client, versions.name, versions.flagging, "image_auroc", "auto")
    assert not decision.promote and "canary was rolled back" in decision.reason


def test_the_shadow_comparison_reaches_the_challenger_in_the_registry(app, versions, normal_pngs):
    move(app, versions, "challenger", versions.b)
    wait_for(lambda: {r["shadow"] for r in rollout(app.url)["replicas"].values()} == {versions.b}, 120,
             "both replicas holding the shadow")
    for i in range(24):
        answer = score(app.url, normal_pngs[i % len(normal_pngs)], f"press-{i % 2 + 1}")
        assert answer["model"]["version"] == versions.a  # the shadow never answers
    def report() -> dict | None:
        r = httpx.post(f"{app.url}/rollout/report", timeout=60)
        return r.json() if r.status_code == 200 and r.json()["overall"]["images"] >= 24 else None
    table = wait_for(report, 60, "a shadow report over 24 images")
    assert table["shadow"] == versions.b and table["champion"] == versions.a and set(table["lines"]) >= {"press-1"}
    tags = versions.client.get_model_version(versions.name, versions.b).tags
    assert int(tags["shadow.images"]) >= 24 and 0.0 <= float(tags["shadow.agreement"]) <= 1.0
    run_id = versions.client.get_model_version(versions.name, versions.b).run_id
    listed = [f.path for f in versions.client.list_artifacts(run_id, f"rollout/shadow-v{versions.b}")]
    assert f"rollout/shadow-v{versions.b}/shadow.md" in listed


def test_plantad_rollout_prints_the_declared_and_served_versions_and_writes_the_report(app, versions, capsys):
    from plantad.cli import main as cli_main

    assert cli_main(["rollout", "status", "--url", app.url]) == 0
    out = capsys.readouterr().out
    assert f"declared: champion v{versions.a}, last-known-good v{versions.a}" in out and f"shadow v{versions.b}" in out
    assert out.count(f"serving v{versions.a}") == 2, out
    assert f"canary v{versions.flagging} rolled back: canary reject rate" in out
    assert cli_main(["rollout", "report", "--url", app.url]) == 0
    out = capsys.readouterr().out
    assert f"Shadow v{versions.b} against champion v{versions.a}" in out and "| (all) |" in out
