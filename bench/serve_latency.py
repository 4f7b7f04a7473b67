"""Online scoring latency and throughput through Ray Serve, against raw in-process `score_batch`.

The production architecture (configs/production.yaml, ViT-S/14 teacher) with random weights is
saved as a model folder and served by the real app (`build_app`, model_dir). Clients send one PNG
per request over HTTP at each concurrency; the raw figure is `score_batch` on a tensor batch of
serve.max_batch_size images in this process, measured right before and after each round of
requests (the ratio is what counts on a shared machine, whose speed drifts by up to 25% within
minutes: each level runs several rounds and reports the median one). Serve runs in the mode of the
clusters plantad starts (plantad.cluster.SERVE_ENV); RAY_SERVE_THROUGHPUT_OPTIMIZED=0 in the
environment measures Ray Serve's default data plane instead.
`--modes` serves the app once per batching mode (window: every request waits for the batch window;
idle: a request that finds nothing else queued or scoring skips it, serve.idle_skips_batch_wait;
zero: batch_wait_timeout_s 0), and `--floor` adds the same Predictor behind a plain FastAPI + uvicorn
app in one process (bench/floor_app.py), with the same client and images. Before the load, the
stages of one single-image request are timed in this process (decoding, pre-processing, forward,
answer building with its JSON encoding).
`--ingress` serves the modes once per way in, each on a new Ray cluster started with its environment:
proxy (Serve's HTTP proxy, which sends each request to the replica as a Ray actor call, as SERVE_ENV
leaves it), grpc (the proxy sends it over gRPC, RAY_SERVE_PROXY_USE_GRPC=1) and direct (Serve's direct
ingress, RAY_SERVE_ENABLE_DIRECT_INGRESS=1: the replica answers HTTP on a port of its own, which the
client calls; the proxy still runs on the head node, unused).
Usage: python bench/serve_latency.py [--size 224] [--batch 16] [--concurrent-batches 1] [--requests 64]
       [--rounds 3] [--concurrency 1 8 32] [--modes idle] [--floor] [--ingress proxy direct]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from plantad.cluster import SERVE_ENV, with_serve_env
from plantad.config import load_settings, settings_from_dict
from plantad.data.images import ImageTransform
from plantad.models.checkpoint import save_model
from plantad.scoring import score_batch
from plantad.training.loop import build_model, resolve_device


def random_model_dir(config: str, size: int, out: Path) -> Path:
    settings = load_settings(config, ["model.teacher.weights=random", f"data.image_size={size}"])
    model = build_model(settings)
    model.noisy_or.threshold.fill_(0.5)  # a stored threshold: random weights, throughput only
    save_model(model, settings, out)
    return out


def png_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class RawScorer:
    """score_batch on decoded, transformed batches in this process (no HTTP, no Serve)."""

    def __init__(self, model_dir: Path, pngs: list[bytes], batch: int, device: str) -> None:
        from plantad.models.checkpoint import META_FILE, load_model, recorded_sha256
        from plantad.models.exported import for_scoring, runtime_of

        model, meta = load_model(model_dir, device=resolve_device(device))
        # the model's own settings, as the replica's Predictor reads them (scoring.cpu_amp and
        # scoring.runtime included: the same graph from the same cache)
        self.settings = settings_from_dict(meta["settings"], source=str(model_dir))
        self.model = for_scoring(model, self.settings.scoring, recorded_sha256(model_dir / META_FILE))
        self.runtime = runtime_of(self.model)
        transform = ImageTransform(self.settings.data.image_size)
        x = torch.stack([transform(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs[:batch]])
        self.x = x.to(next(model.parameters()).device)
        self.images_per_s(1)  # warm-up

    def images_per_s(self, iters: int) -> tuple[float, float]:
        """Median images/s over `iters` calls, and this process's CPU ms per image."""
        times = []
        cpu0 = time.process_time()
        for _ in range(iters):
            t = time.perf_counter()
            score_batch(self.model, self.x, self.settings.scoring, amp=self.settings.train.amp)
            if self.x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        cpu_ms = (time.process_time() - cpu0) / (iters * self.x.shape[0]) * 1000.0
        return self.x.shape[0] / statistics.median(times), cpu_ms


async def load_test(url: str, pngs: list[bytes], concurrency: int, requests: int) -> tuple[list[float], float]:
    """Per-request latencies (s) and wall time for `requests` single-image requests."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(pngs[i % len(pngs)])
    latencies: list[float] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            png = queue.get_nowait()
            t = time.perf_counter()
            r = await client.post(f"{url}/score", files=[("files", ("x.png", png, "image/png"))])
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        return latencies, time.perf_counter() - started


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROLES = {"proxy": "ray::ProxyActor", "replica": "ray::ServeReplica"}
# environment of each way in, over SERVE_ENV; direct ingress holds a replica that stops for at least
# 30 s (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S) so that load balancers can drop it: 0 here,
# where nothing balances and each mode's replica is deleted before the next one starts
INGRESS = {"proxy": {}, "grpc": {"RAY_SERVE_PROXY_USE_GRPC": "1"},
           "direct": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}}


def role_pids() -> dict[str, list[int]]:
    """Serve's proxy and replica processes of this bench's cluster (this process's descendants, not
    another job's on the same machine), by the titles Ray gives its actors."""
    import psutil

    found: dict[str, list[int]] = {role: [] for role in ROLES}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:  # a worker that exited meanwhile
            continue
        for role, title in ROLES.items():
            if cmd.startswith(title):
                found[role].append(proc.pid)
    return found


def direct_port(replicas: list[int]) -> int:
    """The HTTP port that the replica listens on with direct ingress (Serve's range for it)."""
    import psutil
    from ray.serve._private.constants import (RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT as HIGH,
                                              RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT as LOW)

    ports = {c.laddr.port for pid in replicas for c in psutil.Process(pid).net_connections("inet")
             if c.status == psutil.CONN_LISTEN and LOW <= c.laddr.port <= HIGH}
    if len(ports) != 1:
        raise RuntimeError(f"expected one direct-ingress port in {LOW}-{HIGH} on the replica, found {sorted(ports)}")
    return ports.pop()


def stage_ms(model_dir: Path, png: bytes, repeats: int = 50) -> dict[str, float]:
    """Median wall ms of each stage of one single-image request, run in this process on the replica's
    code, and the forward's CPU ms (all threads)."""
    from fastapi.responses import JSONResponse

    from plantad.config import ServeConfig
    from plantad.serving.answers import ScoredJob, native_answer
    from plantad.serving.inputs import decode_all
    from plantad.serving.predictor import Predictor, split_scores

    predictor, cfg = Predictor.load(str(model_dir)), ServeConfig()
    predictor.warm_up()
    stages: dict[str, list[float]] = {"decode": [], "pre-process": [], "forward": [], "answer + JSON": []}
    forward_cpu: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        items = decode_all([("x.png", png)], cfg)
        t1 = time.perf_counter()
        x = torch.stack([predictor.transform(items[0].decoded.image)])
        t2 = time.perf_counter()
        c2 = time.process_time()
        out = score_batch(predictor.model, x, predictor.settings.scoring, amp=predictor.settings.train.amp)
        scores = split_scores(out, predictor.threshold, False)
        t3 = time.perf_counter()
        forward_cpu.append((time.process_time() - c2) * 1000.0)
        JSONResponse(native_answer(items, ScoredJob(scores, predictor), False, predictor, cfg.max_heatmap_side))
        t4 = time.perf_counter()
        for name, a, b in zip(stages, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            stages[name].append((b - a) * 1000.0)
    return {**{name: statistics.median(v) for name, v in stages.items()},
            "forward CPU": statistics.median(forward_cpu)}


def start_floor(model_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """bench/floor_app.py in its own process; (process, URL) once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("floor_app.py")), str(model_dir),
                             str(port), str(threads)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the floor app exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the floor app did not answer within 120 s")


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system, all threads) so far of this process (the client), of Serve's, and
    of the whole machine (Ray's control plane and everything else included)."""
    import psutil

    def total(pid: int) -> float:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system

    out = {"client": total(os.getpid())}
    out.update({role: sum(total(p) for p in ps) for role, ps in pids.items()})
    machine = psutil.cpu_times()
    out["machine"] = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0


MODES = {"window": (0.01, False), "idle": (0.01, True), "zero": (0.0, False)}  # batch_wait_timeout_s, idle skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/production.yaml")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16, help="serve.max_batch_size and the raw batch")
    parser.add_argument("--concurrent-batches", type=int, default=1, help="serve.max_concurrent_batches")
    parser.add_argument("--requests", type=int, default=64, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["idle"],
                        help="batching modes, each served in turn (window 0.01 s; idle: window unless alone; zero)")
    parser.add_argument("--floor", action="store_true", help="also a plain FastAPI + uvicorn app, one process")
    parser.add_argument("--ingress", nargs="+", choices=list(INGRESS), default=["proxy"],
                        help="ways in, each on its own new Ray cluster: Serve's proxy with actor calls, with gRPC, "
                             "or direct ingress (the replica's own HTTP port)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    os.environ.update(with_serve_env(os.environ))  # before Ray starts: its processes inherit it
    serve_mode = ", ".join(f"{k}={os.environ[k]}" for k in SERVE_ENV)
    base_env = {k: os.environ.get(k) for env in INGRESS.values() for k in env}
    import ray
    from ray import serve

    from plantad.serving.app import build_app

    cpus = os.cpu_count() or 1
    gpu = torch.cuda.is_available() and args.device != "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="plantad-serve-bench-"))
    model_dir = random_model_dir(args.config, args.size, tmp / "model")
    pngs = png_images(max(args.batch, 32), args.size)
    def start_cluster(ingress: str) -> int:
        """A new Ray cluster with `ingress`'s environment and Serve's HTTP proxy on loopback; its port."""
        for k, v in base_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.environ.update(INGRESS[ingress])  # the cluster's processes inherit it
        # replica logs (one access line per request) stay in Ray's log files: streamed to this process
        # they would cost the client's CPU, which on one machine is taken from the model
        ray.init(num_cpus=cpus, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        return port

    def deploy(mode: str, ingress: str, port: int, first: bool) -> tuple[str, dict[str, list[int]]]:
        """The app in `mode`, warmed up; the URL its clients call and its proxy and replica processes."""
        wait, idle = MODES[mode]
        if not first:
            serve.delete("bench")  # the previous mode's replica goes before the next one's is counted
        serve.run(build_app({"model_dir": str(model_dir), "device": args.device, "max_batch_size": args.batch,
                             "max_concurrent_batches": args.concurrent_batches,
                             "max_ongoing_requests": max(64, args.batch * args.concurrent_batches),
                             "max_queued_requests": 1024, "batch_wait_timeout_s": wait,
                             "idle_skips_batch_wait": idle, "port": port,
                             "ray_actor_options": {"num_cpus": cpus, "num_gpus": 1 if gpu else 0}}),
                  name="bench", route_prefix="/")
        roles = role_pids()
        url = f"http://127.0.0.1:{direct_port(roles['replica']) if ingress == 'direct' else port}"
        asyncio.run(load_test(url, pngs, 2, 4))  # warm-up
        return url, roles

    port = start_cluster(args.ingress[0])
    url, pids = deploy(args.modes[0], args.ingress[0], port, True)
    served_model = httpx.get(f"{url}/model", timeout=60).json()
    threads = served_model["torch_threads"]
    torch.set_num_threads(threads)  # the raw figure uses the replica's intra-op threads
    raw_scorer = RawScorer(model_dir, pngs, args.batch, args.device)
    print(f"torch {torch.__version__}, {cpus} CPUs{', GPU ' + torch.cuda.get_device_name() if gpu else ''}; "
          f"{args.config} random weights at {args.size} px; {threads} torch threads in the replica and for raw; "
          f"runtime {served_model['runtime']} served, {raw_scorer.runtime} raw; "
          f"serve.max_batch_size {args.batch}, serve.max_concurrent_batches {args.concurrent_batches}; {serve_mode}; "
          f"ways in: {', '.join(f'{i} {INGRESS[i]}' for i in args.ingress)}; "
          f"raw = score_batch at batch {args.batch}, measured right before and after each round while Serve is idle")
    stages = stage_ms(model_dir, pngs[0])
    forward_cpu = stages.pop("forward CPU")
    print("\nOne single-image request's stages in this process, median wall ms of 50: "
          + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()) + f" (sum {sum(stages.values()):.2f}); "
          f"the single-image forward's CPU ms {forward_cpu:.2f}")
    print(f"\n{args.rounds} rounds per level of raw, {args.requests} served requests, raw; a round's ratio is its "
          "served img/s over the mean of its two raw figures, and the row is the round with the median ratio "
          "(latencies: all rounds); modes: window = every request waits up to batch_wait_timeout_s 0.01 s, "
          "idle = the same unless nothing else is queued or scoring (serve.idle_skips_batch_wait), zero = "
          "batch_wait_timeout_s 0; floor = the same Predictor in one FastAPI + uvicorn process, no Serve")
    print("| app | concurrency | requests | p50 ms | p95 ms | p99 ms | p99/p50 | served img/s | raw img/s | "
          "served/raw | all rounds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    spent: dict[tuple[str, int], dict[str, float]] = {}
    raw_cpu: list[float] = []
    floor = None

    def levels(label: str, target: str, roles: dict[str, list[int]]) -> None:
        for c in args.concurrency:
            lat: list[float] = []
            rounds: list[tuple[float, float, float]] = []  # (ratio, served img/s, raw img/s)
            cpu_level = {k: 0.0 for k in cpu_seconds(roles)}
            for _ in range(args.rounds):
                before, cpu_ms = raw_scorer.images_per_s(args.iters)
                raw_cpu.append(cpu_ms)
                cpu_before = cpu_seconds(roles)
                round_lat, wall = asyncio.run(load_test(target, pngs, c, args.requests))
                cpu_after = cpu_seconds(roles)
                for k in cpu_level:
                    cpu_level[k] += cpu_after[k] - cpu_before[k]
                after, cpu_ms = raw_scorer.images_per_s(args.iters)
                raw_cpu.append(cpu_ms)
                lat += round_lat
                raw = (before + after) / 2
                rounds.append((args.requests / wall / raw, args.requests / wall, raw))
            spent[(label, c)] = {k: v / (args.rounds * args.requests) * 1000.0 for k, v in cpu_level.items()}
            ratio, served, raw = sorted(rounds)[len(rounds) // 2]
            every = " ".join(f"{r[0]:.2f}" for r in rounds)
            print(f"| {label} | {c} | {args.rounds} x {args.requests} | {pct(lat, 50):.1f} | {pct(lat, 95):.1f} | "
                  f"{pct(lat, 99):.1f} | {pct(lat, 99) / pct(lat, 50):.2f} | {served:.2f} | {raw:.2f} | "
                  f"{ratio:.2f} | {every} |", flush=True)

    try:
        for k, ingress in enumerate(args.ingress):
            if k:
                serve.shutdown()  # the previous way in's cluster goes before the next one starts
                ray.shutdown()
                port = start_cluster(ingress)
            for n, mode in enumerate(args.modes):
                if k or n:
                    url, pids = deploy(mode, ingress, port, n == 0)
                levels(f"{ingress} {mode}" if len(args.ingress) > 1 else mode, url, pids)
        if args.floor:
            serve.delete("bench")  # the floor runs alone on the machine, as each mode did
            floor, floor_url = start_floor(model_dir, threads)
            asyncio.run(load_test(floor_url, pngs, 2, 4))  # warm-up
            levels("floor", floor_url, {"proxy": [], "replica": [floor.pid]})
        raw_cpu_ms = statistics.mean(raw_cpu)
        # where the CPU goes: on a machine where client, proxy and replica share the cores, every
        # CPU-ms spent outside the model is taken from it
        print(f"\nCPU ms per request (user + system, all threads); the forward: {forward_cpu:.1f} CPU ms for one "
              f"image alone (concurrency 1), raw score_batch {raw_cpu_ms:.1f} CPU ms per image at batch {args.batch} "
              "(other levels); the floor's server process is in the replica column")
        print("| app | concurrency | client | Serve proxy | replica | server minus the forward | whole machine |")
        print("|---|---|---|---|---|---|---|")
        for (label, c), ms in spent.items():
            model = forward_cpu if c == 1 else raw_cpu_ms
            print(f"| {label} | {c} | {ms['client']:.1f} | {ms['proxy']:.1f} | {ms['replica']:.1f} | "
                  f"{ms['proxy'] + ms['replica'] - model:.1f} | {ms['machine']:.1f} |")
    finally:
        if floor is not None:
            floor.terminate()
            floor.wait(30)
        ray.shutdown()  # the bench's own cluster, Serve with it (serve.shutdown() first only adds a raylet error line)
        shutil.rmtree(tmp, ignore_errors=True)  # the model is ~170 MB at ViT-S size


if __name__ == "__main__":
    main()
