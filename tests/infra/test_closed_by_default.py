"""Closed by default: every server plantad starts listens on loopback, and each credential check holds.

Servers are started the way the project starts them: a Ray head with `plantad serve --detach`'s
`ray start --head` arguments and environment, the session's local cluster through
`plantad.cluster.start_local`, the scoring app through `launch.deploy` (what `plantad serve` runs),
and `mlflow/ui.sh` (here with MLflow's basic-auth app). Serve's API keys are tested in
tests/serving/test_app.py; here, that keys given to `plantad serve` reach the replica unseen.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from infra.fixtures import MLFLOW_SERVER_ENV, free_port, start_mlflow_server, stop_process_group, tool, wait_for
from plantad.cluster import LOOPBACK_ENV, head_env, head_start_args
from plantad.config import RayConfig, ServeConfig

REPO = Path(__file__).resolve().parents[2]


def listening(root: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket of `root` and its descendants."""
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections("inet")
            name = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:  # exited meanwhile
            continue
        found += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def not_loopback(sockets: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(addr, "ipv4_mapped", None)
        return (mapped or addr).is_loopback

    return [(name[:80], ip, port) for name, ip, port in sockets if not loopback(ip)]


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@dataclass
class Head:
    proc: subprocess.Popen
    address: str
    dashboard: str
    token_file: Path
    env: dict[str, str]  # a clean environment: no Ray token, no loopback variable, an empty HOME


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """`ray start --head` as `plantad serve --detach` runs it, plus --block and free ports.

    HOME is a fresh folder, so the token that head_env makes lands in <HOME>/.ray/auth_token.
    """
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's socket paths must stay short
    home = tmp / "home"
    home.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k not in LOOPBACK_ENV}
    clean.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    ray = tool("ray")
    port, dash = free_port(), free_port()
    args = [*head_start_args(RayConfig(), ray), "--block", "--num-cpus", "1", "--temp-dir", str(tmp / "ray"),
            "--port", str(port), "--dashboard-port", str(dash), "--ray-client-server-port", str(free_port())]
    with open(tmp / "head.log", "w") as log:
        proc = subprocess.Popen(args, env=head_env(RayConfig(), ray, clean), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        dashboard = f"http://127.0.0.1:{dash}"
        wait_for(lambda: proc.poll() is None and http_status(f"{dashboard}/api/version") in (200, 401), 180,
                   lambda: f"the Ray head's dashboard at {dashboard}:\n{(tmp / 'head.log').read_text()[-3000:]}")
        yield Head(proc, f"127.0.0.1:{port}", dashboard, home / ".ray" / "auth_token", clean)
    finally:
        stop_process_group(proc, timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


HEAD_SERVERS = ("gcs_server", "raylet", "dashboard.py", "DashboardAgent", "RuntimeEnvAgent", "ray.util.client.server")


def test_a_ray_head_started_like_plantad_serve_listens_on_loopback_only(ray_head: Head) -> None:
    head = psutil.Process(ray_head.proc.pid)

    def missing() -> list[str]:
        names = " ".join(name for name, _, _ in listening(head))
        return [server for server in HEAD_SERVERS if server not in names]

    wait_for(lambda: not missing(), 120, lambda: f"every server of the head listening (missing: {missing()})")
    sockets = listening(head)
    ports = {port for _, _, port in sockets}
    assert int(ray_head.address.rsplit(":", 1)[1]) in ports and int(ray_head.dashboard.rsplit(":", 1)[1]) in ports
    assert not not_loopback(sockets), not_loopback(sockets)


JOIN = """
import sys
from plantad.cluster import join
from plantad.config import RayConfig
join(RayConfig(), sys.argv[1])
import ray
print("answer", ray.get(ray.remote(lambda: 42).remote()))
"""


# how many times (1 s apart) a driver tries the GCS before ray.init gives up (Ray's default: 20)
TWO_TRIES = {"RAY_gcs_server_port_wait_time_s": "2"}


def _driver(head: Head, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A process joining the head the way plantad's stages do (plantad.cluster.join)."""
    return subprocess.run([sys.executable, "-c", JOIN, head.address], env={**head.env, **env}, capture_output=True,
                          text=True, timeout=180)


def test_joining_the_ray_head_or_its_dashboard_needs_the_token(ray_head: Head) -> None:
    token = ray_head.token_file.read_text().strip()  # ray start found no token, so head_env made one here
    assert len(token) >= 32
    # another user (a HOME without ~/.ray/auth_token) is refused; the user who started the head joins
    # from a new shell, with nothing set: plantad presents the token it finds in ~/.ray
    stranger = ray_head.token_file.parent.parent.parent / "stranger"
    stranger.mkdir(exist_ok=True)
    # a refused driver tries again once a second, 20 times by default: 2 tries show the refusal
    refused = _driver(ray_head, {"HOME": str(stranger), **TWO_TRIES})
    assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr, refused.stderr[-3000:]
    assert f"the Ray cluster at {ray_head.address} refused this process's auth token (InvalidAuthToken): it found " \
           "none to present" in refused.stderr, refused.stderr[-3000:]
    # what that user sees from a plantad command: the reason, not Ray's bare "Failed to connect"
    status = subprocess.run([sys.executable, "-m", "plantad.cli", "status"], capture_output=True, text=True,
                            timeout=180, env={**ray_head.env, "HOME": str(stranger), "RAY_ADDRESS": ray_head.address,
                                              **TWO_TRIES})
    assert status.returncode == 2 and f"error: the Ray cluster at {ray_head.address} refused this process's auth " \
           "token (InvalidAuthToken): it found none to present. Give it the token" in status.stderr, status.stderr[-3000:]
    same_user = _driver(ray_head, {})
    assert same_user.returncode == 0 and "answer 42" in same_user.stdout, same_user.stderr[-3000:]
    wrong = _driver(ray_head, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * len(token), **TWO_TRIES})
    assert wrong.returncode != 0 and "refused this process's auth token (InvalidAuthToken): it is not the " \
           "cluster's" in wrong.stderr, wrong.stderr[-3000:]
    joined = _driver(ray_head, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    assert joined.returncode == 0 and "answer 42" in joined.stdout, joined.stderr[-3000:]
    assert http_status(f"{ray_head.dashboard}/api/version") == 401
    assert http_status(f"{ray_head.dashboard}/api/version", {"Authorization": f"Bearer {token}"}) == 200


STATE_FROM_A_TASK = """
import sys
from plantad.cluster import join
from plantad.config import RayConfig
join(RayConfig(), sys.argv[1])
import ray

@ray.remote
def nodes() -> int:  # what Ray Train's placement-group cleaner does from inside the cluster
    from ray.util.state import list_nodes
    return len(list_nodes())

print("nodes", ray.get(nodes.remote()))
"""


def test_a_joined_job_s_workers_find_their_cluster_while_another_runs_on_the_machine(ray_local, ray_head) -> None:
    """Two clusters on one machine (the session's and the head): the state API that Ray Train's
    cleaner calls from a worker finds the cluster the job joined, not "multiple active Ray instances"."""
    done = subprocess.run([sys.executable, "-c", STATE_FROM_A_TASK, ray_head.address], env=ray_head.env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "nodes 1" in done.stdout, done.stderr[-3000:]


def png_bytes() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def dashboard_json(path: str) -> str:
    """A GET of the session cluster's dashboard (REST API), with the session's Ray token."""
    import ray

    base = ray._private.worker.global_worker.node.address_info["webui_url"]
    request = urllib.request.Request(f"http://{base}{path}",
                                     headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.read().decode()


def test_the_session_cluster_and_a_served_app_listen_on_loopback_only(ray_local, trained_tiny, monkeypatch) -> None:
    """`plantad serve`'s launch.deploy of the scoring app (a model folder) on the session's cluster:
    every listening socket of every process, the replica's included (Serve starts its gRPC server on
    `[::]:0`), is on loopback; the API key in the driver's environment reaches the replica but not
    the Serve config, the dashboard's API or the replica's environment; the HTTP deadline is Serve's,
    and a request past it gets a 408 while the replica goes on answering."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from plantad.serving.launch import deploy
    from plantad.serving.security import key_digest

    _, result = trained_tiny
    key = secrets.token_hex(16)
    monkeypatch.setenv("PLANTAD_TEST_DRIVER_KEYS", key)  # the session's replicas started without it
    cfg = ServeConfig(port=free_port(), app_name="closed", model_dir=str(result.model_path.parent),
                      api_keys_env="PLANTAD_TEST_DRIVER_KEYS", ray_actor_options={"num_cpus": 0.5},
                      # a lone /score request waits 30 s for its batch to fill: slower than the deadline
                      request_timeout_s=3.0, max_batch_size=4, batch_wait_timeout_s=30.0,
                      idle_skips_batch_wait=False)
    url = deploy(cfg)
    try:
        me = psutil.Process()
        sockets = listening(me)  # pytest, moto's thread, and the processes of the session's Ray cluster
        assert any("gcs_server" in name for name, _, _ in sockets), sockets
        replica_ports = [port for name, _, port in sockets if name.startswith("ray::ServeReplica")]
        assert replica_ports, f"no listening socket of a Serve replica among {sockets}"
        assert not not_loopback(sockets), not_loopback(sockets)

        assert http_status(f"{url}/model") == 401
        assert http_status(f"{url}/model", {"Authorization": f"Bearer {key}"}) == 200
        shown = dashboard_json("/api/serve/applications/") + dashboard_json("/api/v0/actors?detail=1&limit=10000")
        assert '"closed"' in shown  # the app is listed, without its key
        assert key not in shown and key_digest(key) not in shown
        replicas = [p for p in me.children(recursive=True) if " ".join(p.cmdline()).startswith("ray::ServeReplica")]
        assert replicas and all(key not in json.dumps(p.environ()) for p in replicas)

        http = ray.get(_get_global_client()._controller.get_http_config.remote())
        assert (http.host, http.port, http.request_timeout_s) == ("127.0.0.1", cfg.port, 3.0)
        started = time.monotonic()
        slow = httpx.post(f"{url}/score", files={"image": ("slow.png", png_bytes(), "image/png")},
                          headers={"Authorization": f"Bearer {key}"}, timeout=60)
        waited = time.monotonic() - started
        assert slow.status_code == 408 and 3.0 <= waited < 20.0, (slow.status_code, slow.text[:300], waited)
        assert http_status(f"{url}/model", {"Authorization": f"Bearer {key}"}) == 200  # still answering
    finally:
        serve.shutdown()


AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{db}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen, str]]:
    """mlflow/ui.sh of a copy of the project, with `--app-name basic-auth`; (URL, process, admin password)."""
    root = tmp_path_factory.mktemp("ui-project")
    (root / "mlflow").mkdir()
    shutil.copy2(REPO / "mlflow" / "ui.sh", root / "mlflow" / "ui.sh")
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    (root / "auth.ini").write_text(AUTH_INI.format(db=root / "auth.db"))
    password = "pw-" + os.urandom(8).hex()
    port = free_port()
    env = {**os.environ, **MLFLOW_SERVER_ENV, "PORT": str(port), "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = start_mlflow_server(["bash", str(root / "mlflow" / "ui.sh"), "--app-name", "basic-auth"], env,
                               root / "ui.log", port)
    try:
        yield f"http://127.0.0.1:{port}", proc, password
    finally:
        stop_process_group(proc)


def test_mlflow_ui_listens_on_loopback_only(mlflow_ui) -> None:
    url, proc, _ = mlflow_ui
    sockets = listening(psutil.Process(proc.pid))
    assert any(port == int(url.rsplit(":", 1)[1]) for _, _, port in sockets), sockets
    assert not not_loopback(sockets), not_loopback(sockets)


def test_mlflow_basic_auth_refuses_without_credentials_and_works_with_them(mlflow_ui, monkeypatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    url, _, password = mlflow_ui
    assert http_status(f"{url}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-" + password)
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient(url).search_experiments(max_results=1)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(url)
    run = client.create_run(client.create_experiment("closed-by-default"))
    client.log_metric(run.info.run_id, "image_auroc", 0.5)
    assert client.get_run(run.info.run_id).data.metrics == {"image_auroc": 0.5}


def test_a_stage_process_that_connects_from_a_clean_environment_gets_a_loopback_node(tmp_path: Path) -> None:
    """What `dvc repro`'s train stage does in the main job: `plantad.cluster.connect` in a fresh
    process whose environment has none of plantad's Ray variables (the test session's has them)."""
    env = {k: v for k, v in os.environ.items() if k not in LOOPBACK_ENV and not k.startswith("RAY_")}
    # its own Ray temp dir (short: Ray's socket paths are limited): a main job's cluster left running on
    # this machine, which connect() would join, is not this test's subject
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    code = ("from plantad.cluster import connect; from plantad.config import RayConfig; connect(RayConfig()); "
            "import ray; print('node', ray.util.get_node_ip_address()); ray.shutdown()")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                              env={**env, "HOME": str(tmp_path), "RAY_TMPDIR": ray_tmp},
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "node 127.0.0.1" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_plantad_serve_stop_from_a_clean_environment_returns(ray_head: Head) -> None:
    """`plantad serve --stop`, as the main job prints it, joins the head it started and returns
    (it imported Ray before setting the loopback variable, and then hung joining from another IP)."""
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.address, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(ray_head.token_file)}
    proc = subprocess.run([tool("plantad"), "serve", "--stop"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to stop: There is no Serve instance running on this Ray cluster" in proc.stdout
