"""Real storage and tracking services for tests: moto's S3 server, an MLflow server, DVC, Ray.

Import the fixtures into a conftest (`from infra.fixtures import moto_s3, ...`; `tests/` is on
sys.path because tests/infra and tests/tracking are packages). Import them in ONE conftest per
directory tree: each conftest that imports a session fixture gets its own instance.
Everything listens on 127.0.0.1 only and is shut down at the end.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from plantad.cluster import start_local
from plantad.config import RayConfig, S3Config
from plantad.tracking.s3 import ensure_bucket, storage_env

BUCKET = "plantad-test"
MLFLOW_PREFIX = "mlflow"  # s3://<bucket>/mlflow/<experiment id>/... holds the MLflow artifacts
# MLflow 3's server starts a job runner (huey consumers, ~8 processes) unless told not to: without
# it the server starts 2-3x faster on 2 cores and stops in ~2 s instead of up to ~12 s.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
_AWS_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED",
)


def tool(name: str) -> str:
    """Path of a console script of this interpreter's environment (dvc, mlflow), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"executable '{name}' not found next to {sys.executable} or on PATH")
    return found


def run_checked(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Run a command; on failure raise with its output (so a failed `dvc push` says why)."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def wait_for(check, timeout_s: float, what, every_s: float = 0.25):
    """Poll `check` until it returns something true, and return that; `what` (a string, or a callable
    for a message built at the end) says what was awaited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not after {timeout_s:.0f} s: {what() if callable(what) else what}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server(no_files: Path) -> Iterator[S3Config]:
    """moto's S3 server in a thread on 127.0.0.1:<free port>, bucket `plantad-test` created.

    Sets fake AWS credentials in os.environ (restored after) and points the AWS config files at
    `no_files` (absent), but NOT the endpoint: code under test must pass it (S3Config / storage_env).
    """
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    for k in _AWS_VARS:
        os.environ.pop(k, None)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_CONFIG_FILE=str(no_files), AWS_SHARED_CREDENTIALS_FILE=str(no_files))
    werkzeug_log = logging.getLogger("werkzeug")  # moto logs every request at INFO
    old_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        cfg = S3Config(endpoint_url=f"http://{host}:{port}", bucket=BUCKET, region="us-east-1")
        ensure_bucket(cfg)
        yield cfg
    finally:
        server.stop()
        werkzeug_log.setLevel(old_level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Config]:
    """moto_server for the session; ~/.aws hidden."""
    with moto_server(tmp_path_factory.mktemp("aws") / "absent") as cfg:
        yield cfg


def _wait_healthy(url: str, proc: subprocess.Popen, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited {proc.returncode}:\n{log_file.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"mlflow server at {url} not healthy after {timeout:.0f}s:\n{log_file.read_text()[-4000:]}")


def stop_process_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the group the process leads (started with start_new_session=True), then SIGKILL."""
    import signal

    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def start_mlflow_server(args: list[str], env: dict[str, str], log_file: Path, port: int) -> subprocess.Popen:
    with open(log_file, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, log_file, timeout=120)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc


@contextmanager
def mlflow_server_process(s3: S3Config, root: Path) -> Iterator[str]:
    """`mlflow server` (SQLite in `root`) proxying artifacts to s3://<bucket>/mlflow; its URI.

    With --artifacts-destination, clients upload through the server (mlflow-artifacts:/ URIs), so
    only the server needs the S3 endpoint and credentials.
    """
    port = free_port()
    args = [tool("mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{s3.bucket}/{MLFLOW_PREFIX}",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, **storage_env(s3), **MLFLOW_SERVER_ENV}
    proc = start_mlflow_server(args, env, root / "server.log", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="session")
def mlflow_server(moto_s3: S3Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """mlflow_server_process for the session."""
    with mlflow_server_process(moto_s3, tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


@pytest.fixture
def tmp_git_dvc_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`git init` + `dvc init` in tmp_path; DVC's global/system config and site cache kept in tmp."""
    home = tmp_path / ".tool-home"
    home.mkdir()
    (home / "gitconfig").write_text("[user]\n\tname = plantad tests\n\temail = tests@plantad.invalid\n")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(home / "dvc-site-cache"))
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(home / "dvc-global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(home / "dvc-system"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo = tmp_path / "repo"
    repo.mkdir()
    run_checked(["git", "init", "-q"], repo)
    run_checked([tool("dvc"), "init", "-q"], repo)
    return repo


@pytest.fixture(scope="session")
def ray_local(moto_s3: S3Config) -> Iterator[None]:
    """One local Ray cluster (2 CPUs, with its dashboard) for the session, started after moto_s3.

    Ray's workers inherit os.environ as it is at ray.init(), so the fake AWS credentials must be
    set first. Token auth (on by default since Ray 2.59) gets a per-session RAY_AUTH_TOKEN in the
    environment, so nothing is written to ~/.ray/auth_token (shared by all local clusters of the
    user). ray.init() leaves RAY_AUTH_MODE=token in os.environ; both are restored at the end.
    """
    import ray

    if ray.is_initialized():  # someone else owns the cluster: use it, check the workers see the keys
        seen = ray.get(ray.remote(lambda: os.environ.get("AWS_ACCESS_KEY_ID")).remote())
        if seen != os.environ.get("AWS_ACCESS_KEY_ID"):
            raise RuntimeError("Ray was started before moto_s3 set the AWS credentials; start it after")
        yield
        return
    with local_ray():
        yield


@contextmanager
def local_ray() -> Iterator[None]:
    """A local Ray cluster of 2 CPUs with its dashboard, started as plantad starts one (every port
    on 127.0.0.1), with a per-use RAY_AUTH_TOKEN in os.environ; the dashboard serves the state API
    that Ray Train's placement-group cleaner polls."""
    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    if not any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    start_local(RayConfig(), num_cpus=2, include_dashboard=True)  # also sets RAY_AUTH_MODE=token in os.environ
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def two_versions(model_dir: Path, png: bytes, root: Path, name: str = "plantad-two-versions",
                 tracking_uri: str | None = None) -> tuple[str, str, list[str]]:
    """A registry holding the model in `model_dir` twice (the answers' version says which one
    served): (tracking URI, model name, [version, version]). A SQLite one under `root`, or the
    server at `tracking_uri` (its own artifact store: for nodes that share no folder)."""
    import mlflow
    from mlflow import MlflowClient

    from plantad.tracking.pyfunc import log_pyfunc_model
    from plantad.tracking.registry import register_version

    uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(name, artifact_location=None if tracking_uri else str(root / "artifacts"))
    mlflow.set_tracking_uri(uri)
    try:
        versions = []
        for _ in range(2):
            with mlflow.start_run(experiment_id=exp) as run:
                info = log_pyfunc_model(model_dir, png)
            versions.append(str(register_version(client, name, run.info.run_id, "model", model_id=info.model_id).version))
    finally:
        mlflow.set_tracking_uri(None)
    return uri, name, versions
