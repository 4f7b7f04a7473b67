"""serve.idle_skips_batch_wait: a request that finds nothing else queued or scoring on its replica
is scored at once, while requests that arrive together still share a `@serve.batch` call. The app
runs with a batch window far longer than a tiny model's forward, so waiting for it shows."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from infra.fixtures import free_port, wait_for
from plantad.config import ServeConfig

pytestmark = pytest.mark.e2e
WINDOW_S = 8.0  # serve.batch_wait_timeout_s of this app
BATCH = 4  # serve.max_batch_size


@pytest.fixture(scope="module")
def long_window(ray_local, trained_tiny) -> str:
    """The scoring app on a model folder, with an 8 s batch window; its URL."""
    from ray import serve

    from plantad.serving.app import build_app

    _, result = trained_tiny
    port = free_port()
    cfg = ServeConfig(port=port, model_dir=str(result.model_path.parent), ray_actor_options={"num_cpus": 0.5},
                      max_batch_size=BATCH, batch_wait_timeout_s=WINDOW_S, idle_skips_batch_wait=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg.model_dump()), name="window", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def batch_sizes(text: str) -> tuple[float, float]:
    """(calls, calls of one request) of this app's plantad_batch_requests histogram in Prometheus text."""
    def value(pattern: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(pattern + r"[^\n]*\} ([0-9.e+]+)", text))
    app = r'[^\n]*application="window"'
    return (value(r"ray_plantad_batch_requests_count\{" + app),
            value(r'ray_plantad_batch_requests_bucket\{(?=[^\n]*le="1(?:\.0)?")' + app))


def test_a_lone_request_skips_the_batch_window_and_concurrent_ones_share_a_batch(long_window, demo_root,
                                                                                  demo_manifest):
    import ray

    png = (demo_root / demo_manifest.iloc[0]["path"]).read_bytes()
    files = [("files", ("part.png", png, "image/png"))]
    started = time.monotonic()
    lone = httpx.post(f"{long_window}/score", files=files, timeout=60)
    waited = time.monotonic() - started
    assert lone.status_code == 200, lone.text[:300]
    assert waited < WINDOW_S / 2, f"a lone request took {waited:.1f} s with a {WINDOW_S} s batch window"

    async def together(n: int) -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            answers = await asyncio.gather(*[client.post(f"{long_window}/score", files=files) for _ in range(n)])
        return [a.status_code for a in answers]

    # 2 x max_batch_size + 1 at once: the first may find the replica idle, the others queue behind it
    assert asyncio.run(together(2 * BATCH + 1)) == [200] * (2 * BATCH + 1)
    port = ray.nodes()[0]["MetricsExportPort"]

    def shared() -> tuple[float, float] | None:  # batch histograms reach the endpoint in periodic exports
        calls, singles = batch_sizes(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        return (calls, singles) if calls - singles >= 1 else None

    calls, singles = wait_for(shared, 60, "a @serve.batch call of the window app with more than one request")
    assert singles >= 1  # the lone request: a batch of one
