"""Memory a serving replica needs to hold two model versions during a swap.

For each settings file, a model of that architecture is saved (random weights: the size, not the
values, matters). Then:
- a fresh process loads it as a Predictor, warms it up at `scoring.batch_size`, and loads and warms
  up a second version beside it, as a swap does: its resident memory (RSS) after the imports, after
  one version and after two, and its peak RSS;
- `launch.deploy` (what `plantad serve` runs) serves it from a model folder on a new local Ray
  cluster: the Serve replica's RSS once ready (its warm-up done) and its peak (VmHWM).

    python bench/replica_memory.py [--config params.yaml configs/production.yaml] [--runtime torch]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["params.yaml", "configs/production.yaml"])
    parser.add_argument("--runtime", default="torch", choices=["torch", "openvino"])
    args = parser.parse_args()
    print("| settings | model.pt MiB | process: after imports | + one version | + second version | peak | "
          "Serve replica: one version | replica peak |")
    print("|---|---|---|---|---|---|---|---|")
    for config in args.config:
        m = measure(Path(config), args.runtime)
        print(f"| {config} ({args.runtime}) | {m['weights_file'] / MIB:.0f} | {m['base'] / MIB:.0f} | "
              f"{(m['one'] - m['base']) / MIB:.0f} | {(m['two'] - m['one']) / MIB:.0f} | {m['peak'] / MIB:.0f} | "
              f"{m['replica'] / MIB:.0f} | {m['replica_peak'] / MIB:.0f} |")
    print("(MiB; RSS: resident memory)")


if __name__ == "__main__":
    main()
