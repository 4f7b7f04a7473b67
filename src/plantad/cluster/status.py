"""`plantad status`: the cluster a job would join, what it has free, what holds the rest, and the
scoring app with the version it serves; without the variables `ray status` needs (the loopback
mode and the token's location), which plantad sets itself."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import httpx

from plantad.cluster.capacity import list_holders, read_capacity
from plantad.cluster.connect import check_ray_address, job_address, join
from plantad.config import Settings

NO_CLUSTER = ("no Ray cluster to show: none is running on this machine (`ray start --head`, which `bash scripts/main.sh` "
              "and `plantad serve --detach` run) and neither ray.address nor RAY_ADDRESS names one")


def served_model(url: str, api_key: str | None) -> str:
    """One line on what GET <url>/model says: the version that answers, or why it cannot be read."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{url}/model", headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        return f"{url}/model did not answer: {type(exc).__name__}: {exc}"
    if r.status_code != 200:
        return f"{url}/model answered HTTP {r.status_code}" + (" (set the API key's variable)" if r.status_code == 401 else "")
    m = r.json()
    swap = m.get("last_swap_error")
    loaded = m.get("loaded_at")
    if isinstance(loaded, (int, float)):
        loaded = datetime.fromtimestamp(loaded, timezone.utc).isoformat(timespec="seconds")
    return (f"{m.get('name')} v{m.get('version')}" + (f" (@{m['alias']})" if m.get("alias") else "")
            + f", runtime {m.get('runtime')}, loaded {loaded}"
            + (f"; last swap error: v{swap['version']}: {swap['error']}" if swap else ""))


def cluster_status(settings: Settings, api_key: str | None = None) -> list[str]:
    """The lines `plantad status` prints; ConnectionError when no cluster is running."""
    address, source = job_address(settings.ray)
    if address is None:
        raise ConnectionError(NO_CLUSTER)
    check_ray_address(address, source)
    join(settings.ray, address, logging_level=logging.WARNING, log_to_driver=False)
    from ray import serve

    from plantad.serving.launch import base_url

    lines = [f"Ray cluster {address} ({source}): {read_capacity(samples=1).text()}"]
    try:
        holders = list_holders()
        lines += ["  held by:"] + [f"    {h.text()}" for h in holders] if holders else ["  nothing holds CPUs or GPUs"]
    except Exception as exc:  # the state API needs the cluster's dashboard
        lines.append(f"  (what holds them is unknown: Ray's state API did not answer: {exc})")
    apps = serve.status().applications
    if not apps:
        lines.append("Serve: no application is running (`plantad serve --detach` deploys one)")
    for name, app in apps.items():
        replicas = ", ".join(f"{d} " + ", ".join(f"{n} {getattr(state, 'value', state)}"
                                                 for state, n in dep.replica_states.items())
                             for d, dep in app.deployments.items())
        lines.append(f"Serve app '{name}' {getattr(app.status, 'value', app.status)}: {replicas}")
        if name == settings.serve.app_name:
            url = base_url(settings.serve)
            lines.append(f"  {url}: {served_model(url, api_key)}")
    return lines
