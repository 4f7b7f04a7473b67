"""`plantad serve`'s steps with serve.direct_ingress in a process of its own (the setting acts when a
cluster starts, and the test session's cluster is already up): start a local cluster, deploy the
ServeConfig given as JSON in argv[1], print {"url", "direct"} as one JSON line, and stop the cluster
when stdin closes (ray.shutdown, without serve.delete's 30 s direct-ingress drain)."""

from __future__ import annotations

import json
import sys

from plantad.config import RayConfig, ServeConfig
from plantad.serving import launch


def main() -> None:
    cfg = ServeConfig.model_validate(json.loads(sys.argv[1]))
    launch.connect_for_serving(RayConfig(), detach=False, direct_ingress=cfg.direct_ingress)
    import ray

    try:
        url = launch.deploy(cfg)
        print(json.dumps({"url": url, "direct": launch.direct_urls(cfg)}), flush=True)
        sys.stdin.read()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
