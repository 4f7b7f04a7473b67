"""The floor for bench/serve_latency.py: the same Predictor behind a plain FastAPI app in one uvicorn
process (no Ray, no Serve proxy, no batching): multipart in, one `Predictor.score` per request on one
scoring thread (forwards never overlap, as in a replica with serve.max_concurrent_batches 1), JSON out.
Usage: python bench/floor_app.py MODEL_DIR PORT THREADS
"""

from __future__ import annotations

import asyncio
import io
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from plantad.serving.predictor import Predictor


def floor_app(model_dir: str) -> FastAPI:
    predictor = Predictor.load(model_dir)
    predictor.warm_up()
    scorer = ThreadPoolExecutor(1, thread_name_prefix="floor-score")
    app = FastAPI()

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        form = await request.form()
        images = [Image.open(io.BytesIO(await part.read())).convert("RGB")
                  for _, part in form.multi_items() if hasattr(part, "read")]
        scores = await asyncio.get_running_loop().run_in_executor(scorer, predictor.score, images)
        return JSONResponse({"results": [{"probability": s.probability, "is_anomalous": s.is_anomalous,
                                          "threshold": s.threshold} for s in scores]})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app


if __name__ == "__main__":
    model_dir, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)  # the replica's intra-op threads
    uvicorn.run(floor_app(model_dir), host="127.0.0.1", port=port, log_level="warning", access_log=False)
