"""A node lost under online scoring, in a process of its own (the test session's shared Ray cluster
stays untouched): a three-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head of
1 CPU with Serve's controller and its only HTTP proxy, two workers of 2 CPUs), one replica per
worker (2 CPUs each, so none fits on the head), clients scoring in a loop, and a worker removed
(raylet and workers killed, as a pre-empted VM): the one whose replica made the rollout controller
actor (an actor dies with its owner, and the surviving replica makes a new one). While the node
is gone the champion alias moves to another version; then a node is added back. Writes a JSON
report: every request's outcome and time, the nodes, the controller actors and the recovery times.

    python tests/cluster/multinode_serve.py <tracking uri> <model name> <version a> <version b> <png> <report.json>
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

CLIENTS = 4
MAX_ONGOING = 2  # per replica: at most this many requests can be in flight on the lost node


def alive_actors(kind: str) -> dict[str, tuple[str, str]]:
    """Alive actors whose class name contains `kind` -> (node, name)."""
    from ray.util.state import list_actors

    return {a.actor_id: (a.node_id, a.name or "") for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if kind in (a.class_name or "")}


def controllers() -> list[dict]:
    """The alive rollout controller actors: id, node, and the node of their owner (the replica that
    made one: an actor dies with its owner)."""
    from ray._private.state import actors

    return [{"id": a["ActorID"], "node": a["Address"]["NodeID"], "owner_node": a["OwnerAddress"]["NodeID"]}
            for a in actors().values() if a["ActorClassName"] == "ControllerActor" and a["State"] == "ALIVE"]


class Clients:
    """Clients that score one image each in a loop and retry a failed request until it is answered:
    every attempt is kept as (start, end, status, served version)."""

    def __init__(self, url: str, png: bytes) -> None:
        self.url, self.png = url, png
        self.attempts: list[dict] = []
        self.lost: list[str] = []  # requests never answered within the retry budget
        self.stop = threading.Event()

    def one(self, http) -> dict:
        import httpx

        start = time.monotonic()
        try:
            r = http.post(f"{self.url}/score", files=[("files", ("x.png", self.png, "image/png"))],
                          params={"line": "press-1"})
            status = r.status_code
            version = r.json()["model"]["version"] if status == 200 else None
            detail = "" if status == 200 else r.text[:200]
        except httpx.HTTPError as exc:
            status, version, detail = 0, None, repr(exc)[:200]
        return {"start": start, "end": time.monotonic(), "status": status, "version": version, "detail": detail}

    def client(self) -> None:
        import httpx

        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                for _ in range(200):
                    attempt = self.one(http)
                    self.attempts.append(attempt)
                    if attempt["status"] == 200:
                        break
                    time.sleep(0.2)
                else:
                    self.lost.append(attempt["detail"])

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        return threads


def wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not after {timeout_s:.0f} s: {what}")


def main(tracking_uri: str, model: str, version_a: str, version_b: str, png: str, report: str) -> int:
    import httpx
    import ray
    from mlflow import MlflowClient
    from ray import serve

    from cluster_helpers import start_multinode
    from infra.fixtures import free_port
    from plantad.serving.app import build_app
    from plantad.tracking.registry import CHAMPION, set_alias

    cluster, workers = start_multinode(head_cpus=1, worker_cpus=2)
    registry = MlflowClient(tracking_uri)
    set_alias(registry, model, CHAMPION, version_a)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = {"model_name": model, "tracking_uri": tracking_uri, "num_replicas": 2, "port": port,
            "ray_actor_options": {"num_cpus": 2}, "max_ongoing_requests": MAX_ONGOING, "max_queued_requests": 2,
            "max_batch_size": 2, "alias_poll_s": 0.5, "drift": {"enabled": False}, "rollout": {"follow_s": 0.25}}
    result: dict = {"head": cluster.head_node.node_id, "workers": [w.node_id for w in workers]}
    started = time.monotonic()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="plantad", route_prefix="/", blocking=False)

    def status() -> dict:
        try:
            return httpx.get(f"{url}/rollout", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def serving(version: str, n: int) -> bool:
        replicas = status().get("replicas", {})
        return len(replicas) == n and all(r.get("serving") == version for r in replicas.values())

    wait_until(lambda: serving(version_a, 2), 240, "two replicas serving the champion")
    result["up_s"] = time.monotonic() - started
    replicas = alive_actors("ServeReplica")
    result["replica_nodes"] = sorted(node for node, _ in replicas.values())
    result["proxy_nodes"] = sorted(node for node, _ in alive_actors("ProxyActor").values())
    result["controller_before"] = controllers()
    # the worker whose replica made the rollout controller (it dies with its owner), else the one it runs on
    owners = {c["owner_node"] for c in result["controller_before"]}
    hosts = {c["node"] for c in result["controller_before"]}
    victim = (next((w for w in workers if w.node_id in owners), None)
              or next((w for w in workers if w.node_id in hosts), None) or workers[0])
    result["victim"] = victim.node_id

    clients = Clients(url, Path(png).read_bytes())
    threads = clients.run()
    time.sleep(2)  # steady traffic on both replicas
    removed = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)
    result["removed_at_s"] = removed - started
    time.sleep(1)
    set_alias(registry, model, CHAMPION, version_b)  # declared while the node is gone
    moved = time.monotonic()
    wait_until(lambda: serving(version_b, 1), 120, "the surviving replica serving the new champion")
    result["survivor_follows_s"] = time.monotonic() - moved
    added = time.monotonic()
    cluster.add_node(num_cpus=2)
    try:
        wait_until(lambda: serving(version_b, 2), 120, "two replicas again, both serving the new champion")
    except AssertionError as exc:  # what each side saw, for the test's message
        result.update(error=str(exc), rollout=status(), controllers=controllers(),
                      serve=str(serve.status().applications["plantad"].deployments),
                      replicas=alive_actors("ServeReplica"))
        Path(report).write_text(json.dumps(result, indent=2, default=str))
        raise
    result["capacity_back_s"] = time.monotonic() - added
    time.sleep(1)  # traffic on the restored capacity
    clients.stop.set()
    for t in threads:
        t.join(timeout=90)
    result["replica_nodes_after"] = sorted(node for node, _ in alive_actors("ServeReplica").values())
    result["controller_after"] = controllers()
    result["attempts"] = [{**a, "start": a["start"] - removed, "end": a["end"] - removed} for a in clients.attempts]
    result["lost"] = clients.lost
    result["seconds"] = time.monotonic() - started
    Path(report).write_text(json.dumps(result, indent=2, default=str))
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:7]))
