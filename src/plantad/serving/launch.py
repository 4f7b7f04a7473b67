"""`plantad serve`: join the configured Ray cluster (or start one), deploy the app, wait for /readyz.

With `detach`, a local cluster is started by `ray start --head` so that it and the app outlive
the command; `plantad serve --stop` removes the app (the cluster stays until `ray stop`).
API keys in this process's environment or `serve.api_keys_file` reach every replica as digests in
the cluster's key-value store (serving/security.py), never in the app's args.
With `serve.direct_ingress`, a cluster that this command starts runs Ray Serve's direct ingress: each
replica also answers HTTP itself on a port of its own (30000 up on each node), without the proxy's
hop; the proxy keeps `serve.port` on the head node.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from plantad.cluster import check_ray_address, head_env, head_start_args, job_address, join, start_local
from plantad.config import RayConfig, ServeConfig
from plantad.serving.security import check_auth_closed, publish_api_keys, read_api_keys


def _ray_executable() -> str:
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise RuntimeError(f"the `ray` command is not next to {sys.executable} nor on PATH: install plantad[pipeline]")
    return found


# Ray Serve 2.60 reads it when its controller and replicas import Serve: it must be in the
# cluster's environment when the cluster starts (over plantad.cluster.SERVE_ENV's "0")
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}


def connect_for_serving(cfg: RayConfig, detach: bool, direct_ingress: bool = False) -> str:
    """Connect to ray.address / RAY_ADDRESS, else a new local cluster on ray.host (with Serve's direct
    ingress when `direct_ingress`; a running cluster keeps its own environment); returns a description."""
    address, source = job_address(cfg)
    if address:
        check_ray_address(address, source)
        join(cfg, address)
        return f"the Ray cluster at {address} ({source})"
    extra = DIRECT_INGRESS_ENV if direct_ingress else {}
    if not detach:
        os.environ.update(extra)  # the cluster's processes inherit this process's environment
        start_local(cfg)
        return f"a local Ray cluster of this process on {cfg.host} (stops with it)"
    ray = _ray_executable()
    env = head_env(cfg, ray, {**os.environ, **extra})
    started = subprocess.run(head_start_args(cfg, ray), env=env, capture_output=True, text=True)
    if started.returncode != 0 and "already" not in (started.stdout + started.stderr):
        raise RuntimeError(f"`ray start --head` failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
    join(cfg, job_address(cfg)[0] or "auto")  # the head's address, as a later `plantad serve` joins it
    return f"the local Ray cluster started by `ray start --head` on {cfg.host} (stop it with `ray stop`)"


def base_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def wait_ready(url: str, api_key: str | None, timeout_s: float = 300.0) -> dict:
    """Poll GET /readyz until it answers 200 (401 without a key also proves the app is up)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", headers=headers, timeout=5.0)
            if r.status_code in (200, 401):
                return r.json()
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise RuntimeError(f"{url}/readyz not ready after {timeout_s:.0f} s (last: {last})")


def direct_urls(cfg: ServeConfig) -> list[str]:
    """The base URLs of the app's replicas under direct ingress, from Ray Serve's target groups (its
    controller's `get_target_groups`, internal in Ray 2.60); [] when the cluster runs without it.

    A replica listens on serve.host: on loopback the URL names serve.host, else the replica's node IP."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    groups = ray.get(controller.get_target_groups.remote(cfg.app_name))
    wildcard = cfg.host in ("0.0.0.0", "::")
    return sorted(f"http://{t.ip if wildcard else cfg.host}:{t.port}{cfg.route_prefix.rstrip('/')}"
                  for g in groups if g.protocol == RequestProtocol.HTTP and g.app_name == cfg.app_name
                  for t in g.targets if t.name.startswith("SERVE_REPLICA"))


def wait_direct(cfg: ServeConfig, timeout_s: float = 30.0) -> list[str]:
    """direct_urls once the controller has the ports of all serve.num_replicas replicas (it learns
    them on its next loop after the replicas start); an error naming the setting if none comes."""
    deadline = time.monotonic() + timeout_s
    while True:
        urls = direct_urls(cfg)
        if len(urls) >= cfg.num_replicas or (urls and cfg.autoscaling) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not urls:
        raise RuntimeError(f"serve.direct_ingress is true but no replica of '{cfg.app_name}' answers on a port of its "
                           f"own after {timeout_s:.0f} s: the Ray cluster runs without Serve's direct ingress. Start it "
                           "with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in its environment (deploy/raycluster.yaml), let "
                           "`plantad serve` start it, or set serve.direct_ingress: false")
    return urls


def http_options(cfg: ServeConfig) -> dict[str, object]:
    """Serve's HTTP options: serve.host:serve.port (127.0.0.1 unless configured otherwise) and the
    request deadline (serve.request_timeout_s; Serve answers 408 past it)."""
    return {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s}


def start_http(cfg: ServeConfig) -> None:
    """Serve's HTTP proxy with `http_options(cfg)`."""
    from ray import serve

    serve.start(http_options=http_options(cfg))


def deploy(cfg: ServeConfig) -> str:
    """Start Serve's HTTP proxy and run the app with this process's API keys; returns its base URL
    (the proxy's; with serve.direct_ingress, once the replicas' own URLs are known: `direct_urls`).
    Refuses, before anything starts, to serve without keys on a host other than loopback."""
    from ray import serve

    from plantad.serving.app import build_app

    keys = read_api_keys(cfg)
    check_auth_closed(cfg, bool(keys))
    start_http(cfg)
    publish_api_keys(cfg.app_name, keys)
    # the replicas read the published digests; the file (a path on this machine) is not read again there
    args = cfg.model_copy(update={"api_keys_file": None}).model_dump(mode="json")
    serve.run(build_app(args), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    url = base_url(cfg)
    wait_ready(url, min(keys) if keys else None)
    if cfg.direct_ingress:
        wait_direct(cfg)
    return url


def stop(ray_cfg: RayConfig, cfg: ServeConfig) -> str:
    address, _ = job_address(ray_cfg)
    if address is None:
        return "nothing to stop: no Ray cluster is running on this machine"
    # before `import ray`: it sets the environment Ray reads on import; Ray's INFO lines would bury the answer
    join(ray_cfg, address, logging_level=logging.WARNING, log_to_driver=False)
    from ray import serve
    from ray.serve.exceptions import RayServeException

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its "Deleting app" line repeats our answer
    try:
        serve.delete(cfg.app_name)
    except RayServeException as exc:  # no Serve on this cluster: nothing to stop
        return f"nothing to stop: {exc}"
    publish_api_keys(cfg.app_name, frozenset())  # the app's key digests leave the cluster with it
    return f"deleted Serve app '{cfg.app_name}'; the Ray cluster keeps running (`ray stop` stops a local one)"
