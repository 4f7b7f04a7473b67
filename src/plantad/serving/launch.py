"""`plantad serve`: join the configured Ray cluster (or start one), deploy the app, wait for /readyz.

With `detach`, a local cluster is started by `ray start --head` so that it and the app outlive
the command; `plantad serve --stop` removes the app (the cluster stays until `ray stop`).
API keys in this process's environment or `serve.api_keys_file` reach every replica as digests in
the cluster's key-value store (serving/security.py), never in the app's args.
"""

from __future__ import annotations

import logging
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


def connect_for_serving(cfg: RayConfig, detach: bool) -> str:
    """Connect to ray.address / RAY_ADDRESS, else a new local cluster on ray.host; returns a description."""
    address, source = job_address(cfg)
    if address:
        check_ray_address(address, source)
        join(cfg, address)
        return f"the Ray cluster at {address} ({source})"
    if not detach:
        start_local(cfg)
        return f"a local Ray cluster of this process on {cfg.host} (stops with it)"
    ray = _ray_executable()
    started = subprocess.run(head_start_args(cfg, ray), env=head_env(cfg, ray), capture_output=True, text=True)
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


def http_options(cfg: ServeConfig) -> dict[str, object]:
    """Serve's HTTP options: serve.host:serve.port (127.0.0.1 unless configured otherwise) and the
    request deadline (serve.request_timeout_s; Serve answers 408 past it)."""
    return {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s}


def start_http(cfg: ServeConfig) -> None:
    """Serve's HTTP proxy with `http_options(cfg)`."""
    from ray import serve

    serve.start(http_options=http_options(cfg))


def deploy(cfg: ServeConfig) -> str:
    """Start Serve's HTTP proxy and run the app with this process's API keys; returns its base URL.
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
