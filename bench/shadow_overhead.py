"""What a shadow version costs the champion's answers: latency with shadow scoring off and on.

Two registered versions of the production architecture (configs/production.yaml, random weights,
the second with moved weights) in a throw-away SQLite registry; one replica serves the champion
with `serve.rollout.shadow` set. Rounds alternate between no `challenger` alias (shadow off) and
the alias on the second version (every image also scored by the shadow, after the answer), so
both conditions see the same drift of a shared machine. Clients send one PNG per request.
Usage: python bench/shadow_overhead.py [--size 224] [--requests 48] [--rounds 3] [--concurrency 1 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import mlflow
import torch
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import free_port, load_test, pct, png_images, random_model_dir  # noqa: E402

from plantad.cluster import SERVE_ENV, with_serve_env  # noqa: E402
from plantad.models.checkpoint import load_model, save_model  # noqa: E402
from plantad.config import settings_from_dict  # noqa: E402
from plantad.tracking.pyfunc import log_pyfunc_model  # noqa: E402
from plantad.tracking.registry import CHAMPION, register_version, set_alias  # noqa: E402

NAME = "plantad-shadow-bench"


def moved_copy(src: Path, out: Path) -> Path:
    model, meta = load_model(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("teacher."):
                p.add_(0.01 * torch.randn_like(p))
    save_model(model, settings_from_dict(meta["settings"], source=str(src)), out)
    return out


def register(uri: str, model_dir: Path, png: bytes, artifacts: Path) -> str:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("shadow-bench")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "shadow-bench", artifact_location=str(artifacts))  # not ./mlruns in the working folder
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment_id) as run:
            info = log_pyfunc_model(model_dir, png)
        return str(register_version(client, NAME, run.info.run_id, "model", model_id=info.model_id).version)
    finally:
        mlflow.set_tracking_uri(None)


def wait_shadow(url: str, want: str | None, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    replicas: list = []
    while time.monotonic() < deadline:
        replicas = list(httpx.get(f"{url}/rollout", timeout=60).json()["replicas"].values())
        if replicas and all(r["shadow"] == want for r in replicas):
            return
        time.sleep(0.5)
    errors = [r.get("last_error") for r in replicas]
    raise TimeoutError(f"the replica did not {'load' if want else 'drop'} the shadow within {timeout_s:.0f} s "
                       f"(last errors: {errors})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/production.yaml")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=48, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per condition and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--memory-gib", type=float, default=4.0, help="serve.ray_actor_options.memory")
    args = parser.parse_args()

    os.environ.update(with_serve_env(os.environ))
    import ray
    from ray import serve

    from plantad.serving.app import build_app

    cpus = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="plantad-shadow-bench-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    pngs = png_images(32, args.size)
    first = random_model_dir(args.config, args.size, tmp / "a")
    champion = register(uri, first, pngs[0], tmp / "artifacts")
    shadow = register(uri, moved_copy(first, tmp / "b"), pngs[0], tmp / "artifacts")
    client = MlflowClient(uri)
    set_alias(client, NAME, CHAMPION, champion)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_name": NAME, "tracking_uri": uri, "device": "cpu", "port": port,
                         "max_queued_requests": 1024, "alias_poll_s": 0.5, "drift": {"enabled": False},
                         # three versions may be held (champion, shadow, the previous champion): the
                         # production architecture needs more than the demo's 1.5 GiB default
                         "ray_actor_options": {"num_cpus": cpus, "memory": args.memory_gib * 2**30},
                         "rollout": {"follow_s": 0.25, "shadow": {"alias": "challenger", "share": 1.0}}}),
              name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    serve_mode = ", ".join(f"{k}={os.environ[k]}" for k in SERVE_ENV)
    print(f"torch {torch.__version__}, {cpus} CPUs; {args.config} random weights at {args.size} px; one replica with "
          f"{cpus} CPUs; {serve_mode}; champion v{champion}, shadow v{shadow} (share 1.0); conditions alternate per "
          f"round, {args.rounds} rounds of {args.requests} requests each")
    print("| concurrency | shadow | p50 ms | p95 ms | img/s | p50 on/off | img/s on/off | noise: round p50 max/min "
          "| shadow-scored | dropped |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    try:
        asyncio.run(load_test(url, pngs, 2, 4))  # warm-up
        for c in args.concurrency:
            lat: dict[bool, list[float]] = {False: [], True: []}
            rate: dict[bool, list[float]] = {False: [], True: []}
            round_p50: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for on in (False, True):
                    if on:
                        set_alias(client, NAME, "challenger", shadow)
                        wait_shadow(url, shadow)
                    else:
                        try:
                            client.delete_registered_model_alias(NAME, "challenger")
                        except Exception:  # not set yet
                            pass
                        wait_shadow(url, None)
                    round_lat, wall = asyncio.run(load_test(url, pngs, c, args.requests))
                    lat[on] += round_lat
                    round_p50[on].append(pct(round_lat, 50))
                    rate[on].append(args.requests / wall)
            table = httpx.get(f"{url}/rollout", timeout=60).json()["shadow"]["overall"]
            for on in (False, True):
                ratio = (f"{pct(lat[True], 50) / pct(lat[False], 50):.2f} | "
                         f"{(sum(rate[True]) / len(rate[True])) / (sum(rate[False]) / len(rate[False])):.2f}"
                         if on else " | ")
                extra = f"{table.get('images', 0)} | {table.get('dropped', 0)}" if on else " | "
                # the spread of one condition's rounds: the bench's own noise, to read the ratio against
                noise = max(round_p50[on]) / min(round_p50[on])
                print(f"| {c} | {'on' if on else 'off'} | {pct(lat[on], 50):.0f} | {pct(lat[on], 95):.0f} | "
                      f"{sum(rate[on]) / len(rate[on]):.2f} | {ratio} | {noise:.2f} | {extra} |", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
