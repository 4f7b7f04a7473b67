"""Join the configured Ray cluster or the one running on this machine, or start a local one whose
ports listen on `ray.host` only.

Without ray.address / RAY_ADDRESS, a job joins the cluster that `ray start --head` left on this
machine (the main job's, which serves the endpoint): one cluster per machine, whose roles share its
resources (plantad.cluster.capacity). Only when none runs does it start a private one.

Ray 2.60 turns a node IP of 127.0.0.1 into the machine's routed address
(`ray._private.services.resolve_ip_for_localhost`) and then listens on every interface. It keeps the
loopback address only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its one-node mode, which also
refuses other nodes). So with `ray.host: 127.0.0.1` every Ray process of this machine that starts or
joins the local cluster gets that variable before `ray` is imported, and the node IP is checked after
`ray.init`. Token authentication (Ray 2.59+) stays on: `ray.init` enables it for a local cluster, and
`ray start --head` is given a token (see `head_env`).

Clusters that plantad starts run Ray Serve's throughput-optimised data plane (`SERVE_ENV`); a cluster
someone else starts gets it from its own environment (deploy/raycluster.yaml sets it).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from plantad.config import RayConfig
from plantad.logs import RAY_WORKER_ENV

log = logging.getLogger(__name__)

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# Ray Serve's throughput-optimised mode (Ray >= 2.55: gRPC from the proxy to the replicas, user
# code on the replica's own event loop, GC frozen after start-up): it cut p99/p50 under load in the
# serving bench (README, "Latency and throughput"). Two of its parts are turned back: direct ingress
# (each replica on its own port; one address per node then needs HAProxy) and log buffering (a
# replica's swap lines would wait behind 1000 access lines). Every Ray process reads these when it
# imports Serve, so they are set before the cluster starts; a value already in the environment wins.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
             "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}


def with_serve_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus SERVE_ENV for the keys it does not set."""
    return {**SERVE_ENV, **env}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cluster_address(cfg: RayConfig) -> tuple[str | None, str]:
    """The cluster to join and where that came from: ray.address, else RAY_ADDRESS, else none (local)."""
    if cfg.address:
        return cfg.address, "ray.address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


def ray_temp_dir() -> Path:
    """Ray's default temp dir on Linux (RAY_TMPDIR, else TMPDIR, else /tmp; plus /ray), without importing `ray`."""
    return Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"


def running_local_cluster(timeout_s: float = 2.0) -> str | None:
    """The GCS address of a live cluster that `ray start --head` started on this machine, else None.

    Ray records it in <temp dir>/ray_current_cluster; a stale record (a crashed head) is ignored."""
    record = ray_temp_dir() / "ray_current_cluster"
    try:
        address = record.read_text().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return address
    except (OSError, ValueError):
        return None


def job_address(cfg: RayConfig) -> tuple[str | None, str]:
    """cluster_address, else the local cluster `ray start --head` left running (None: start one)."""
    address, source = cluster_address(cfg)
    if address:
        return address, source
    found = running_local_cluster()
    return (found, "the cluster `ray start --head` left running on this machine") if found else (None, "none running")


def check_ray_address(address: str, source: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on an unreachable head: `ray.init(address=...)` waits for it for minutes."""
    target = address.removeprefix("ray://")
    if target == "auto" or ":" not in target:
        return  # Ray's own discovery of a local head
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except ValueError as exc:
        raise ValueError(f"{source}={address!r} is not host:port") from exc
    except OSError as exc:
        raise ConnectionError(f"Ray cluster at {address} (from {source}) is not reachable: {exc}. Start the head "
                              "(`ray start --head`), fix the address, or unset it to start a local cluster") from exc


def loopback_node(cfg: RayConfig, address: str | None) -> bool:
    """True when this process's Ray node must be 127.0.0.1: ray.host is loopback and the cluster is
    started here or joined at a loopback address (or `auto`, the local head)."""
    if not is_loopback(cfg.host):
        return False
    target = (address or "auto").removeprefix("ray://")
    return target == "auto" or is_loopback(target.rpartition(":")[0] or target)


def _check_node_ip(cfg: RayConfig) -> None:
    import ray

    ip = ray.util.get_node_ip_address()
    if not is_loopback(ip):
        ray.shutdown()
        raise RuntimeError(f"ray.host is {cfg.host} but this process's Ray node IP is {ip}: `ray` was imported "
                           f"before plantad could set {' '.join(f'{k}={v}' for k, v in LOOPBACK_ENV.items())}; "
                           "set it in the environment, or set ray.host to this node's IP")


def start_local(cfg: RayConfig, **init_kwargs) -> None:
    """`ray.init` of a new cluster that lives in this process (never one already running here: Ray's
    default would join that); GCS, raylet, workers and dashboard on ray.host."""
    loopback = is_loopback(cfg.host)
    if loopback:
        os.environ.update(LOOPBACK_ENV)
    os.environ.update(with_serve_env(os.environ))  # the cluster's processes inherit this environment
    import ray

    ray.init(address="local", dashboard_host=cfg.host, **({} if loopback else {"_node_ip_address": cfg.host}),
             **init_kwargs)
    if loopback:
        _check_node_ip(cfg)


def token_available() -> bool:
    """A Ray auth token this process can present: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).is_file()


def joining_env(cfg: RayConfig, address: str | None) -> bool:
    """Set what Ray reads when it is imported, before the import: loopback mode (returned) and the
    token's mode whenever a token is at hand (a new shell has neither)."""
    loopback = loopback_node(cfg, address)
    if loopback:
        os.environ.update(LOOPBACK_ENV)
    if address and token_available():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    return loopback


def join(cfg: RayConfig, address: str, **init_kwargs) -> None:
    """`ray.init(address=...)` of a running cluster (the token comes from RAY_AUTH_TOKEN / ~/.ray/auth_token).

    A driver presents its token only with RAY_AUTH_MODE=token; a new shell has no such variable, so
    it is set here whenever a token is at hand (the clusters plantad starts all require one)."""
    loopback = joining_env(cfg, address)
    import ray

    if address != "auto" and not address.startswith("ray://"):
        # the job's workers look the cluster up by RAY_ADDRESS, else by "auto", which fails (a traceback
        # from Ray Train's placement-group cleaner) while another Ray cluster runs on this machine
        runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
        runtime_env["env_vars"] = {"RAY_ADDRESS": address, **runtime_env.get("env_vars", {})}
        init_kwargs["runtime_env"] = runtime_env
    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as exc:
        if refused_token(exc):  # Ray's own message says only "Failed to connect to Ray cluster at ..."
            why = "it is not the cluster's" if os.environ.get("RAY_AUTH_MODE") == "token" else "it found none to present"
            raise ConnectionError(
                f"the Ray cluster at {address} refused this process's auth token (InvalidAuthToken): {why}. Give "
                "it the token of the user who started the head (`ray get-auth-token` there) in ~/.ray/auth_token, "
                "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH") from exc
        raise
    if loopback:
        _check_node_ip(cfg)


def refused_token(exc: BaseException) -> bool:
    """Whether Ray's failure to join (`exc` and its causes) was the cluster refusing the token."""
    seen: BaseException | None = exc
    while seen is not None:
        if "InvalidAuthToken" in str(seen) or type(seen).__name__ == "AuthenticationError":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def connect(cfg: RayConfig) -> None:
    """Join the configured cluster, else the one running on this machine, else start a local one
    with its dashboard on ray.host.

    The dashboard serves the state API that Ray Train's placement-group cleaner polls (it warns every
    few seconds without it), and that plantad.cluster.capacity reads to name what holds resources."""
    address, source = job_address(cfg)
    joining_env(cfg, address)  # Ray reads it when it is imported: before the import below
    import ray

    if ray.is_initialized():
        return
    # WARNING: Ray's INFO lines (cluster start, dashboard URL) would bury the stage's own output;
    # the workers' env quiets Ray Data the same way (Ray's log files keep everything)
    quiet = {"logging_level": logging.WARNING, "runtime_env": {"env_vars": dict(RAY_WORKER_ENV)}}
    if address:
        check_ray_address(address, source)
        if ":" in address and not address.startswith("ray://"):
            # Ray Train's placement-group cleaner asks the state API for "the" cluster: on a machine
            # running two, it fails with a ConnectionError in the job's output unless told which
            quiet["runtime_env"]["env_vars"]["RAY_ADDRESS"] = address
        join(cfg, address, log_to_driver=True, **quiet)
        log.info("Ray: joined the cluster at %s (%s)", address, source)
    else:
        start_local(cfg, include_dashboard=True, **quiet)


def head_start_args(cfg: RayConfig, ray_executable: str) -> list[str]:
    """`ray start --head` with every port on ray.host (run it with `head_env`)."""
    node = [] if is_loopback(cfg.host) else ["--node-ip-address", cfg.host]
    return [ray_executable, "start", "--head", "--disable-usage-stats", "--dashboard-host", cfg.host, *node]


def head_env(cfg: RayConfig, ray_executable: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment (`base`, default os.environ) for `ray start --head`: loopback mode when ray.host
    is, Serve's SERVE_ENV, and token auth always.

    `ray start` (unlike `ray.init`) leaves auth off when it finds no token, so one is made first in
    ~/.ray/auth_token unless RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH provides it."""
    env = {**with_serve_env(os.environ if base is None else base),
           **(LOOPBACK_ENV if is_loopback(cfg.host) else {}), "RAY_AUTH_MODE": "token"}
    made = subprocess.run([ray_executable, "get-auth-token", "--generate"], env=env, capture_output=True, text=True)
    if made.returncode != 0:
        raise RuntimeError(f"`ray get-auth-token --generate` failed ({made.returncode}): {made.stderr[-2000:]}")
    return env
