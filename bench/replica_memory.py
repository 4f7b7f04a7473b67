"""Memory a serving replica needs to hold two model versions during a swap.

For each settings file, a model of that architecture is saved (random weights: the size, not the
values, matters). Then:
- a fresh process loads it as a Predictor, warms it up at `scoring.batch_size`, and loads and warms
  up a second version beside it, as a swap does: its resident memory (RSS) after the imports, after
  one version and after two, and its peak RSS;
- `launch.deploy` (what `plantad serve` runs) serves it from a model folder on a new local Ray
  cluster: the Serve replica's RSS once ready (its warm-up done) and its peak (VmHWM);
- the daily loop's swap: two versions registered in a throw-away SQLite registry, the first served
  as champion with the settings file's `serve` section (its reservation, drift on), `--requests`
  images of the demo's size sent, then `champion` moved to the second: what `/rollout` reports
  before the move (resident, what the swap needs) and whether the replica swapped or refused.

    python bench/replica_memory.py [--config params.yaml configs/production.yaml] [--runtime torch]
                                   [--requests 64] [--reserve-mib 1536 2048]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2 ** 20
CHILD = """
import json, resource, sys
from pathlib import Path
from plantad.serving.memory import resident_bytes
import plantad.serving.predictor as predictor_module  # the imports a replica makes before loading
from plantad.tracking.model_source import resolve_model
base = resident_bytes()
runtime = sys.argv[3] or None
one = predictor_module.Predictor.from_ref(resolve_model(sys.argv[1], None), None, "cpu", runtime=runtime)
one.warm_up()
after_one = resident_bytes()
two = predictor_module.Predictor.from_ref(resolve_model(sys.argv[2], None), None, "cpu", runtime=runtime)
two.warm_up()
after_two = resident_bytes()
print(json.dumps({"base": base, "one": after_one, "two": after_two,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def save_random_model(config: Path, out: Path, seed: int) -> None:
    """A calibrated model of `config`'s architecture with random weights (no teacher download)."""
    import torch

    from plantad.config import load_settings
    from plantad.models.checkpoint import save_model
    from plantad.models.factory import build_model

    settings = load_settings(config)
    torch.manual_seed(seed)
    model = build_model(settings, load_teacher_weights=False).eval()
    model.noisy_or.threshold.fill_(0.5)
    model.noisy_or.ema_local.fill_(1.0)
    model.noisy_or.ema_semantic.fill_(1.0)
    save_model(model, settings, out)


REPLICA = """
import json, sys
import psutil
from plantad.cluster import start_local
from plantad.config import RayConfig, ServeConfig
start_local(RayConfig(), num_cpus=2)
from ray import serve
from plantad.serving.launch import deploy
deploy(ServeConfig(model_dir=sys.argv[1], port=int(sys.argv[2]), runtime=sys.argv[3] or None,
                   ray_actor_options={"num_cpus": 1, "memory": None}))
replica = next(p for p in psutil.Process().children(recursive=True)
               if " ".join(p.cmdline()).startswith("ray::ServeReplica"))
status = dict(line.split(":", 1) for line in open(f"/proc/{replica.pid}/status"))
print(json.dumps({"replica": replica.memory_info().rss, "replica_peak": int(status["VmHWM"].split()[0]) * 1024}))
serve.shutdown()
"""


SWAP = """
import json, sys, time, asyncio
import httpx, psutil
sys.path.insert(0, sys.argv[5])
from serve_latency import load_test, png_images
from shadow_overhead import NAME, register
from mlflow import MlflowClient
from plantad.cluster import start_local
from plantad.config import RayConfig, load_settings
from plantad.tracking.registry import CHAMPION, set_alias
from pathlib import Path
config, tmp, port, reserve = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
settings = load_settings(config)
pngs = png_images(16, settings.demo.image_size)
uri = f"sqlite:///{tmp / 'mlflow.db'}"
versions = [register(uri, tmp / f"v{i}", pngs[0], tmp / "artifacts") for i in (1, 2)]
client = MlflowClient(uri)
set_alias(client, NAME, CHAMPION, versions[0])
start_local(RayConfig(), num_cpus=2)
from ray import serve
from plantad.serving.launch import deploy
actor = {**settings.serve.ray_actor_options.model_dump(), "memory": reserve * 2 ** 20}
deploy(settings.serve.model_copy(update={"model_name": NAME, "tracking_uri": uri, "port": port, "alias_poll_s": 0.5,
                                         "ray_actor_options": type(settings.serve.ray_actor_options)(**actor)}))
url = f"http://127.0.0.1:{port}"
asyncio.run(load_test(url, pngs, 4, int(sys.argv[6])))
replica = next(iter(httpx.get(f"{url}/rollout", timeout=60).json()["replicas"].values()))
before = replica["memory"]
set_alias(client, NAME, CHAMPION, versions[1])
deadline, outcome = time.monotonic() + 300, "no answer within 300 s"
while time.monotonic() < deadline:
    if str(httpx.get(f"{url}/model", timeout=60).json()["version"]) == versions[1]:
        outcome = "swapped"
        break
    replica = next(iter(httpx.get(f"{url}/rollout", timeout=60).json()["replicas"].values()))
    if replica.get("last_error"):
        outcome = "refused: " + replica["last_error"]["error"].split("; the serving")[0]
        break
    time.sleep(0.5)
proc = next(p for p in psutil.Process().children(recursive=True)
            if " ".join(p.cmdline()).startswith("ray::ServeReplica"))
status = dict(line.split(":", 1) for line in open(f"/proc/{proc.pid}/status"))
print(json.dumps({**before, "outcome": outcome, "replica_peak_mib": int(status["VmHWM"].split()[0]) // 1024}))
serve.shutdown()
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_json(args: list[str]) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])  # not Serve's log lines


def measure(config: Path, runtime: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory(prefix="plantad-mem-") as tmp:
        dirs = [Path(tmp) / f"v{i}" for i in (1, 2)]
        for i, folder in enumerate(dirs):
            save_random_model(config, folder, seed=i)
        in_process = last_json([CHILD, str(dirs[0]), str(dirs[1]), runtime])
        replica = last_json([REPLICA, str(dirs[0]), str(free_port()), runtime])
        weights = (dirs[0] / "model.pt").stat().st_size
    return {**in_process, **replica, "weights_file": weights}


def swap_after_traffic(config: Path, reserve_mib: int, requests: int) -> dict:
    """The daily loop's swap under a `reserve_mib` reservation, after `requests` scored images."""
    with tempfile.TemporaryDirectory(prefix="plantad-mem-") as tmp:
        for i in (1, 2):
            save_random_model(config, Path(tmp) / f"v{i}", seed=i)
        return last_json([SWAP, str(config), tmp, str(free_port()), str(reserve_mib),
                          str(Path(__file__).resolve().parent), str(requests)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["params.yaml", "configs/production.yaml"])
    parser.add_argument("--runtime", default="torch", choices=["torch", "openvino"])
    parser.add_argument("--requests", type=int, default=64, help="images scored before the swap")
    parser.add_argument("--reserve-mib", type=int, nargs="+", default=[1536, 2048],
                        help="serve.ray_actor_options.memory for the swap rows, in MiB")
    args = parser.parse_args()
    print("| settings | model.pt MiB | process: after imports | + one version | + second version | peak | "
          "Serve replica: one version | replica peak |")
    print("|---|---|---|---|---|---|---|---|")
    for config in args.config:
        m = measure(Path(config), args.runtime)
        print(f"| {config} ({args.runtime}) | {m['weights_file'] / MIB:.0f} | {m['base'] / MIB:.0f} | "
              f"{(m['one'] - m['base']) / MIB:.0f} | {(m['two'] - m['one']) / MIB:.0f} | {m['peak'] / MIB:.0f} | "
              f"{m['replica'] / MIB:.0f} | {m['replica_peak'] / MIB:.0f} |")
    print("(MiB; RSS: resident memory)\n")
    print(f"| settings | reservation | replica after {args.requests} images | swap needs in all | outcome | "
          "replica peak |")
    print("|---|---|---|---|---|---|")
    for config in args.config:
        for reserve in args.reserve_mib:
            m = swap_after_traffic(Path(config), reserve, args.requests)
            print(f"| {config} | {reserve} | {m['resident_mib']} | {m['swap_needs_mib']} | {m['outcome']} | "
                  f"{m['replica_peak_mib']} |", flush=True)


if __name__ == "__main__":
    main()
