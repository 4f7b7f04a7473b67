"""Chaos, part (c): a flaky S3 endpoint during DVC push/pull, MLflow logging, checkpointing and scoring.

Every S3 client of the job talks to a FlakyProxy in front of moto's server that drops DROP of the
requests (half before they reach S3, half after) and delays DELAY of them by DELAY_S. A trial runs
the operation as a user would; when it fails, the error must name the endpoint, and the same command
is run again (at most twice more, the endpoint still flaky). Afterwards everything is checked
against moto directly: recovered = the operation's result is complete and correct; data lost = a
half-written object, a corrupt checkpoint, an incomplete model version or a wrong row is visible.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from chaos_common import Row
from infra.flaky_proxy import FlakyProxy
from pipeline_project import stage_env
from tiny import tiny_settings

DROP, DELAY, DELAY_S = 0.1, 0.1, 1.0
HEAVY_DROP = 0.4
ATTEMPTS = 3  # the first run and two re-runs of the same command


@dataclass
class Outcome:
    ok: bool  # the result is complete and correct
    lost: bool  # something half-written or wrong is visible
    failures: list[str] = field(default_factory=list)  # error messages of failed attempts

    def note(self, endpoint: str) -> str:
        unnamed = sum(endpoint.removeprefix("http://") not in f for f in self.failures)
        text = f"{len(self.failures)} failed attempts" if self.failures else "no failed attempt"
        return text + (f" ({unnamed} not naming the endpoint: {self.failures[0][-160:]})" if unnamed else "")


def attempts(run: Callable[[], object]) -> tuple[object | None, list[str]]:
    """Run up to ATTEMPTS times until it returns; the error messages of the failures."""
    failures = []
    for _ in range(ATTEMPTS):
        try:
            return run(), failures
        except Exception as exc:  # a failed attempt is data for the table
            failures.append(f"{type(exc).__name__}: {exc}")
    return None, failures


@contextmanager
def environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def s3_objects(s3, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, read from moto directly."""
    from plantad.tracking.s3 import s3_client

    client = s3_client(s3)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in keys}


def dvc(repo: Path, env: dict[str, str], *args: str) -> None:
    proc = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-600:]}")


def dvc_push_pull(work: Path, s3, proxy: FlakyProxy, data: Path) -> Outcome:
    """`dvc push` a tracked folder and `dvc pull` it into a clone; every remote object must match its md5."""
    env = stage_env(work)
    repo, prefix = work / "repo", f"chaos-dvc-{uuid.uuid4().hex[:8]}"
    shutil.copytree(data, repo / "data")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "data"],
                ["dvc", "remote", "add", "-d", "store", f"s3://{s3.bucket}/{prefix}"],
                ["dvc", "remote", "modify", "store", "endpointurl", proxy.url]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    _, failures = attempts(lambda: dvc(repo, env, "push"))
    clone = work / "clone"
    shutil.copytree(repo, clone, ignore=shutil.ignore_patterns("cache", "data"))
    _, pull_failures = attempts(lambda: dvc(clone, env, "pull"))
    torn = [k for k, body in s3_objects(s3, prefix).items()
            if hashlib.md5(body).hexdigest() != "".join(k.split("/")[-2:]).removesuffix(".dir")]
    same = all((clone / "data" / p.relative_to(data)).read_bytes() == p.read_bytes()
               for p in data.rglob("*") if p.is_file())
    return Outcome(same and not torn, bool(torn), failures + pull_failures)


def mlflow_logging(work: Path, s3, proxy: FlakyProxy, tracking_uri: str, model_dir: Path, png: bytes) -> Outcome:
    """Log the pyfunc model to an experiment whose artifacts go straight to S3, then register it."""
    import mlflow
    from chaos_dvc import version_problems
    from mlflow import MlflowClient

    from plantad.tracking.pyfunc import log_pyfunc_model
    from plantad.tracking.registry import register_version

    client, name = MlflowClient(tracking_uri), f"chaos-s3-{uuid.uuid4().hex[:8]}"
    exp = client.create_experiment(name, artifact_location=f"s3://{s3.bucket}/{name}")

    def log_and_register() -> str:
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(experiment_id=exp) as run:
            info = log_pyfunc_model(model_dir, png)
        return register_version(client, name, run.info.run_id, "model", model_id=info.model_id).version

    with environ(MLFLOW_S3_ENDPOINT_URL=proxy.url):
        done, failures = attempts(log_and_register)
    with environ(MLFLOW_S3_ENDPOINT_URL=s3.endpoint_url):  # check against moto itself
        problems = version_problems(tracking_uri, name, work)
    return Outcome(done is not None and not problems, bool(problems), failures + problems)


def checkpointing(work: Path, s3, proxy: FlakyProxy, manifest, root: Path) -> Outcome:
    """Ray Train checkpoints to s3:// through the proxy; every checkpoint left must load, the model too."""
    import io

    import torch

    from plantad.data.shards import write_shards
    from plantad.models.checkpoint import load_model
    from plantad.training.ray_train import run_ray_training

    prefix = f"chaos-ckpt-{uuid.uuid4().hex[:8]}"
    settings = tiny_settings("ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.steps_per_epoch=5",
                             "ray.max_failures=2", "train.steps=20", f"ray.storage_path=s3://{s3.bucket}/{prefix}",
                             f"s3.endpoint_url={proxy.url}", f"s3.bucket={s3.bucket}")
    # shards written straight to moto; the workers read them through the proxy
    direct = settings.s3.model_copy(update={"endpoint_url": s3.endpoint_url})
    shards = write_shards(manifest, root, f"s3://{s3.bucket}/{prefix}/shards", direct, 256_000_000)
    result, failures = attempts(lambda: run_ray_training(settings, manifest, shards, work / "model"))
    torn = []
    for key, body in s3_objects(s3, prefix).items():
        if key.endswith(".pt"):
            try:
                torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
            except Exception as exc:  # a torn checkpoint
                torn.append(f"{key}: {exc}")
    ok = result is not None and result.steps == 20 and load_model(result.model_path) is not None
    return Outcome(ok and not torn, bool(torn), failures + torn)


def scoring(work: Path, s3, proxy: FlakyProxy, model_dir: Path, root: Path, relpaths: list[str]) -> Outcome:
    """`plantad score` from s3:// to s3:// through the proxy: one row per image, right bytes, no error rows."""
    from plantad.serving.bulk import run_bulk
    from plantad.serving.bulk.plan import read_results
    from plantad.storage import open_location
    from plantad.tracking.s3 import s3_client

    prefix = f"chaos-score-{uuid.uuid4().hex[:8]}"
    for rel in relpaths:
        s3_client(s3).put_object(Bucket=s3.bucket, Key=f"{prefix}/in/{rel}", Body=(root / rel).read_bytes())
    settings = tiny_settings(f"s3.endpoint_url={proxy.url}", f"s3.bucket={s3.bucket}", "bulk.part_size=8",
                             "bulk.actors=1", "bulk.cpus_per_actor=1", "bulk.batch_size=8")
    src, dst = f"s3://{s3.bucket}/{prefix}/in", f"s3://{s3.bucket}/{prefix}/out"
    summary, failures = attempts(lambda: run_bulk(settings, src, dst, str(model_dir), progress=False))
    if summary is None:
        return Outcome(False, False, failures)
    rows = read_results(open_location(summary.output, s3))
    want = {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in relpaths}
    wrong = [r.relpath for r in rows.itertuples() if isinstance(r.error, str) or want.get(r.relpath) != r.sha256]
    ok = not wrong and sorted(rows["relpath"]) == sorted(want)
    return Outcome(ok, bool(wrong), failures + [f"rows with an error or wrong bytes: {wrong[:3]}"] * bool(wrong))


def fault_row(fault: str, case: Callable[[Path, FlakyProxy], Outcome], work: Path, s3, k: int,
              rng: random.Random, drop: float = DROP) -> Row:
    """K trials of `case`, each behind a new FlakyProxy in front of moto."""
    outcomes, notes = [], []
    for i in range(k):
        trial = work / f"{fault.split()[0].lower()}-{drop:.2f}-{i}"
        trial.mkdir(parents=True)
        with FlakyProxy(s3.endpoint_url, drop, DELAY, DELAY_S, seed=rng.getrandbits(32)) as proxy:
            outcome = case(trial, proxy)
            dropped = proxy.counts["drop-before"] + proxy.counts["drop-after"]
            notes.append(f"{outcome.note(proxy.url)}, {dropped} of {proxy.counts['requests']} requests dropped")
        outcomes.append(outcome)
    return Row(f"flaky S3 ({drop:.0%} dropped, {DELAY:.0%} delayed {DELAY_S:g} s): {fault}", k,
               sum(o.ok for o in outcomes), sum(o.lost for o in outcomes), "; ".join(notes)[:300])


def s3_fault_rows(work: Path, s3, tracking_uri: str, k: int, rng: random.Random) -> list[Row]:
    from plantad.config import DemoConfig
    from plantad.data.demo import generate_demo
    from plantad.data.manifest import scan_dataset
    from plantad.training.trainer import train_model

    root = work / "data"
    generate_demo(root, DemoConfig(seed=0, image_size=64, n_train=24, n_test_good=2, n_test_defect=1))
    manifest = scan_dataset(root)
    trained = train_model(tiny_settings("train.steps=5"), manifest, root, work / "model", progress=False)
    model = trained.model_path.parent
    relpaths = sorted(manifest["path"])[:24]
    cases = {
        "DVC push + pull": lambda w, p: dvc_push_pull(w, s3, p, root / manifest.iloc[0]["category"]),
        "MLflow model logging + registration": lambda w, p: mlflow_logging(w, s3, p, tracking_uri, model,
                                                                           (root / relpaths[0]).read_bytes()),
        "Ray Train checkpoints to S3": lambda w, p: checkpointing(w, s3, p, manifest, root),
        "bulk scoring S3 to S3": lambda w, p: scoring(w, s3, p, model, root, relpaths),
    }
    rows = [fault_row(fault, case, work, s3, k, rng) for fault, case in cases.items()]
    # pyarrow tries each call 3 times: at DROP its own retries suffice; at HEAVY_DROP plantad's do the rest
    return rows + [fault_row("bulk scoring S3 to S3", cases["bulk scoring S3 to S3"], work, s3, k, rng, HEAVY_DROP)]
