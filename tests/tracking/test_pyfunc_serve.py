"""The registered pyfunc model works outside this repository: `mlflow models serve` from a Python
environment that has MLflow and the runtime dependencies but NOT plantad answers /invocations
with the probabilities of the in-process `score_batch`."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from infra.fixtures import free_port, stop_process_group
from plantad.data.images import ImageTransform, decode_image_bytes
from plantad.models.checkpoint import load_model
from plantad.scoring import score_batch
from plantad.tracking.pyfunc import log_pyfunc_model, runtime_requirements
from plantad.tracking.registry import CHAMPION, register_version, set_alias

NAME = "plantad-shipped"
# what pip would put in <env>/bin for the uvicorn package: `mlflow models serve` runs `uvicorn`
UVICORN_SCRIPT = "#!{python}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n"


def outside_env(root: Path) -> Path:
    """A fresh venv whose only link to this one is a `.pth` line naming this venv's site-packages.

    A plain path line does not run the `.pth` files found there, so plantad's editable install is
    invisible; returns the env's python."""
    venv.create(root, with_pip=False, symlinks=True)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "runtime_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    uvicorn = root / "bin" / "uvicorn"
    uvicorn.write_text(UVICORN_SCRIPT.format(python=python))
    uvicorn.chmod(0o755)
    return python


def clean_env(env_bin: Path, tracking_uri: str) -> dict[str, str]:
    """os.environ without this venv's bin or PYTHONPATH; the outside env's bin first on PATH."""
    ours = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != Path(ours).resolve()]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PATH": os.pathsep.join([str(env_bin), *path]), "MLFLOW_TRACKING_URI": tracking_uri}


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve not ready after {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def invoke(url: str, pngs: list[bytes]) -> list[dict]:
    """MLflow's scoring protocol: dataframe_split; a binary column travels as base64 strings."""
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in pngs]}}
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["predictions"]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"/invocations answered {exc.code}: {exc.read()[:2000]!r}") from exc


@pytest.fixture
def registered_champion(tmp_path, trained_tiny, demo_root, demo_manifest, monkeypatch):
    """A version of NAME in a tmp sqlite store, alias champion; (tracking uri, its PNGs, model dir)."""
    _, result = trained_tiny
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("ship", artifact_location=str(tmp_path / "artifacts"))
    rows = demo_manifest[demo_manifest["split"] == "test"]
    pngs = [(demo_root / p).read_bytes() for p in rows.groupby("label").head(2)["path"]]
    with mlflow.start_run(experiment_id=exp) as run:
        info = log_pyfunc_model(result.model_path.parent, pngs[0])
    version = register_version(client, NAME, run.info.run_id, "model", model_id=info.model_id)
    set_alias(client, NAME, CHAMPION, version.version)
    yield uri, pngs, result.model_path.parent, info
    mlflow.set_tracking_uri(None)


def test_logged_model_ships_the_package_and_pinned_requirements(registered_champion):
    uri, _, _, info = registered_champion
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@{CHAMPION}"))
    assert (local / "code" / "plantad" / "serving" / "predictor.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    requirements = (local / "requirements.txt").read_text().split()
    assert not [r for r in requirements if r.split("==")[0] == "plantad"]
    for pin in runtime_requirements():
        assert pin in requirements
    assert {"torch", "timm", "pydantic", "pillow", "mlflow"} <= {r.split("==")[0].lower() for r in requirements}
    assert all("+" not in r for r in requirements)  # no local build labels such as +cpu


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_mlflow_models_serve_without_plantad_installed(registered_champion, tmp_path, trained_tiny):
    uri, pngs, model_dir, _ = registered_champion
    python = outside_env(tmp_path / "outside")
    env = clean_env(python.parent, uri)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    probe = subprocess.run([str(python), "-c", "import mlflow, torch, timm; import plantad"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "No module named 'plantad'" in probe.stderr, probe.stderr[-2000:]

    port = free_port()
    log = tmp_path / "serve.log"
    args = [str(python), "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@{CHAMPION}",
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log)
        predictions = invoke(f"http://127.0.0.1:{port}", pngs)
    finally:
        stop_process_group(proc)

    settings, _ = trained_tiny
    model, _ = load_model(model_dir)
    transform = ImageTransform(settings.data.image_size)
    direct = score_batch(model, torch.stack([transform(decode_image_bytes(b)) for b in pngs]), settings.scoring)
    served = np.array([p["probability"] for p in predictions])
    np.testing.assert_allclose(served, direct.probability.numpy(), rtol=1e-5, atol=1e-6)
    assert [p["is_anomalous"] for p in predictions] == direct.is_anomalous.tolist()
