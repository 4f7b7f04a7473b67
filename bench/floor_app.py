"""The floor for bench/serve_latency.py: the same Predictor behind a plain FastAPI app in one uvicorn
process (no Ray, no Serve proxy, no batching): multipart in, one `Predictor.score` per request on one
forward thread (forwards never overlap, as in a replica with serve.max_concurrent_batches 1; the
replica's one-OpenMP-team discipline, `plantad.serving.forward`), JSON out.
Usage: python bench/floor_app.py MODEL_DIR PORT THREADS
"""

from __future__ import annotations

import io
import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from plantad.serving.forward import install_forward_thread
from plantad.serving.predictor import Predictor


def floor_app(model_dir: str, threads: int) -> FastAPI:
    # the replica's thread discipline: every forward on one thread with the intra-op threads
    forward = install_forward_thread(threads)
    predictor = Predictor.load(model_dir)
    forward.run(predictor.warm_up)
    app = FastAPI()

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        form = await request.form()
        images = [Image.open(io.BytesIO(await part.read())).convert("RGB")
                  for _, part in form.multi_items() if hasattr(part, "read")]
        scores = await forward.call(predictor.score, images)
        return JSONResponse({"results": [{"probability": s.probability, "is_anomalous": s.is_anomalous,
                                          "threshold": s.threshold} for s in scores]})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app


if __name__ == "__main__":
    model_dir, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    uvicorn.run(floor_app(model_dir, threads), host="127.0.0.1", port=port, log_level="warning", access_log=False)
