"""Model versions whose answers tell them apart, registered with their golden outputs as the
register stage records them: a perturbed copy of the trained model (other weights), a copy that
flags every image (threshold near 0), and a version whose recorded outputs are not its own."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from plantad.config import settings_from_dict
from plantad.models.checkpoint import load_model, save_model
from plantad.serving.golden import expected_outputs, golden_images
from plantad.serving.predictor import Predictor
from plantad.tracking.golden import EXPECTED, TAG, record_golden
from plantad.tracking.pyfunc import log_pyfunc_model
from plantad.tracking.registry import register_version

KEPT = ("lineage", "mlflow_run_id", "teacher_weights")


def variant(src: Path, out: Path, noise: float = 0.0, threshold: float | None = None, seed: int = 1) -> Path:
    """A copy of the model in `src` with students' weights moved by `noise` and/or another threshold."""
    model, meta = load_model(src)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if noise and not name.startswith("teacher."):
                p.add_(noise * torch.randn(p.shape, generator=g))
        if threshold is not None:
            model.noisy_or.threshold.fill_(threshold)
    extra = {k: meta[k] for k in KEPT if k in meta}
    if "drift_reference" in meta:
        model.drift_reference = meta["drift_reference"]
    save_model(model, settings_from_dict(meta["settings"], source=str(src)), out, extra)
    return out


def register_dir(client: MlflowClient, experiment_id: str, name: str, model_dir: Path, png: bytes,
                 tamper: float = 0.0) -> str:
    """Log and register `model_dir`; record its golden outputs (moved by `tamper` when set)."""
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        with mlflow.start_run(experiment_id=experiment_id) as run:
            info = log_pyfunc_model(model_dir, png)
            mlflow.log_metric("image_auroc", 0.9)
        version = str(register_version(client, name, run.info.run_id, "model", tags={"teacher_source": "checkpoint"},
                                       model_id=info.model_id).version)
    finally:
        mlflow.set_tracking_uri(None)
    predictor = Predictor.load(str(model_dir), device="cpu", runtime="torch")
    images = golden_images()
    if not tamper:
        record_golden(client, name, version, run.info.run_id, predictor, images)
        return version
    expected = expected_outputs(predictor, images)
    for row in expected["images"].values():
        row["probability"] = (row["probability"] + tamper) % 1.0
    with tempfile.TemporaryDirectory(prefix=f"golden-tampered-{version}-") as tmp:  # logged, then removed
        folder = Path(tmp)
        for g in images:
            (folder / g.name).write_bytes(g.data)
        (folder / EXPECTED).write_text(json.dumps(expected))
        client.log_artifacts(run.info.run_id, str(folder), f"golden/v{version}")
    client.set_model_version_tag(name, version, TAG, f"golden/v{version}")
    return version


NAME = "plantad-rollout-test"


@dataclass
class Versions:
    uri: str
    client: MlflowClient
    name: str
    a: str  # the trained model
    b: str  # other weights
    bad: str  # valid files, recorded golden outputs not its own
    flagging: str  # flags every image


@pytest.fixture(scope="module")
def versions(tmp_path_factory, trained_tiny, demo_root, demo_manifest) -> Versions:
    _, result = trained_tiny
    root = tmp_path_factory.mktemp("rollout-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("rollout", artifact_location=str(root / "artifacts"))
    png = (demo_root / demo_manifest.iloc[0]["path"]).read_bytes()
    src = result.model_path.parent
    a = register_dir(client, exp, NAME, src, png)
    b = register_dir(client, exp, NAME, variant(src, root / "b", noise=0.05), png)
    bad = register_dir(client, exp, NAME, src, png, tamper=0.5)
    flagging = register_dir(client, exp, NAME, variant(src, root / "flagging", threshold=1e-6), png)
    return Versions(uri, client, NAME, a, b, bad, flagging)
