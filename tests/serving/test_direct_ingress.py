"""serve.direct_ingress: the replica answers HTTP on its own port with the scores the proxy gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from infra.fixtures import free_port
from plantad.config import ServeConfig

pytestmark = pytest.mark.e2e
HELPER = Path(__file__).with_name("direct_ingress_app.py")
FIELDS = ["probability", "p_local", "p_semantic", "local_score", "semantic_score"]


def listening_ports(proc: psutil.Process) -> set[int]:
    return {c.laddr.port for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}


def test_direct_ingress_replica_answers_on_its_own_port_with_the_proxys_scores(trained_tiny, demo_root,
                                                                                demo_manifest):
    _, result = trained_tiny
    pngs = [(demo_root / p).read_bytes() for p in demo_manifest[demo_manifest["split"] == "test"].head(3)["path"]]
    cfg = ServeConfig(model_dir=str(result.model_path.parent), port=free_port(), direct_ingress=True,
                      ray_actor_options={"num_cpus": 0.5})
    ray_tmp = tempfile.mkdtemp(prefix="pdi-", dir="/tmp")  # Ray's socket paths must stay short
    # its own cluster: no RAY_ADDRESS, and a temp dir where no `ray start --head` cluster is recorded
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, str(HELPER), cfg.model_dump_json()], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line, f"the helper exited with {proc.wait(60)} before serving"
        urls = json.loads(line)
        assert urls["url"] == f"http://127.0.0.1:{cfg.port}" and len(urls["direct"]) == 1, urls
        direct = urls["direct"][0]
        port = int(direct.rpartition(":")[2])
        files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
        via_proxy = httpx.post(f"{urls['url']}/score", files=files, timeout=60).json()
        via_replica = httpx.post(f"{direct}/score", files=files, timeout=60).json()
        assert via_replica["scored"] == via_proxy["scored"] == len(pngs)
        for field in FIELDS:
            np.testing.assert_allclose([r[field] for r in via_replica["results"]],
                                       [r[field] for r in via_proxy["results"]], rtol=1e-5, err_msg=field)
        assert httpx.get(f"{direct}/healthz", timeout=30).status_code == 200
        # the replica process itself listens on that port; the proxy (still on serve.port) does not
        titles = {p: " ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(recursive=True)}
        replicas = [p for p, t in titles.items() if t.startswith("ray::ServeReplica")]
        proxies = [p for p, t in titles.items() if t.startswith("ray::ProxyActor")]
        assert len(replicas) == 1 and port in listening_ports(replicas[0])
        assert proxies and all(port not in listening_ports(p) and cfg.port in listening_ports(p) for p in proxies)
    finally:
        proc.stdin.close()
        try:
            proc.wait(120)
        finally:
            proc.kill()
            shutil.rmtree(ray_tmp, ignore_errors=True)
