"""Ray Serve application: a FastAPI ingress (native API, Open Inference Protocol, webhook) over one
deployment whose replicas follow `models:/<name>@<alias>` and score in `@serve.batch` batches.

Deploy with `serve run deploy/serve_config.yaml`, `serve deploy deploy/serve_config.yaml` or
`plantad serve`; all of them call `build_app(args)` with the `serve` settings.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views need evaluated
# annotations; as strings, `request: Request` turns into a required query parameter (422).
import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve import Application

from plantad.config import ServeConfig, serve_config_from_dict
from plantad.serving.answers import (V2_OUTPUTS, ScoredJob, ScoreJob, model_block, native_answer, request_status,
                                     score_jobs, v2_answer, v2_band_parameters, v2_datatype, v2_images)
from plantad.serving.bands import key_id
from plantad.serving.drift import LineDrift
from plantad.serving.forward import install_forward_thread
from plantad.serving.holder import FixedLink, ModelHolder
from plantad.serving.inspection import Inspection, page_html, part_ids, query_limit, query_line
from plantad.serving.inputs import (LINE_NAME, ApiError, decode_base64_all, decode_executor, internal_error,
                                    on_executor, parse_json_body, parse_line, parse_score_request, parse_threshold,
                                    read_body)
from plantad.serving.metrics import LineLabels, ServeMetrics
from plantad.serving.predictor import Predictor, prepare
from plantad.serving.rollout import ActorLink, canary_serves, shadow_scores
from plantad.serving.traffic import ShadowJob, ShadowScorer, TrafficBook
from plantad.serving.security import (bind_replica_grpc_to_node_ip, check_auth_closed, check_bearer, load_api_keys,
                                      load_webhook_secret, verify_webhook)
from plantad.serving.swagger import SWAGGER_FILES, swagger_asset

log = logging.getLogger(__name__)
WEBHOOK_MAX_BYTES = 65536

app = FastAPI(title="plantad online scoring", docs_url=None, redoc_url=None, openapi_url=None,
              description="Anomaly probability, decision, branch scores and heatmaps for factory images.")

LINE_SCHEMA = {"type": "string", "pattern": f"^{LINE_NAME.pattern}$",
               "description": "the production line the images come from: the `line` label of the metrics"}
SCORE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "threshold": {"type": "number"}, "heatmap": {"type": "boolean"}, "line": LINE_SCHEMA}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "base64"}},
        "threshold": {"type": "number"}, "heatmap": {"type": "boolean"}, "line": LINE_SCHEMA}}}}}}
V2_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "example": {
    "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["<base64 PNG>"]}],
    "parameters": {"threshold": 0.5, "line": "press-3"}}}}}}}


def _replica_id() -> str:
    """This replica's id (defined above the class: Serve pickles the class when it is decorated)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (tests building the class directly)
        return f"pid-{os.getpid()}"


@serve.deployment
@serve.ingress(app)
class ScoringServer:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.cfg: ServeConfig = serve_config_from_dict(settings, "the app's args")
        bind_replica_grpc_to_node_ip()  # before Serve starts that server, right after this constructor
        self.keys = load_api_keys(self.cfg)
        check_auth_closed(self.cfg, bool(self.keys))
        # before anything runs a torch op: one OpenMP team in this process (serving/forward.py)
        self.forward = install_forward_thread(torch.get_num_threads())  # Ray sets it from num_cpus
        self.decoder = decode_executor(self.cfg.ray_actor_options.num_cpus)
        self.webhook_secret = load_webhook_secret(self.cfg)
        self.metrics = ServeMetrics()
        self.lines = LineLabels(self.cfg.max_lines)
        self.drift = LineDrift(self.cfg.drift)
        self._drift_tests: set[asyncio.Future] = set()  # running tests, kept referenced until done
        self.inspection = Inspection(self.cfg)  # bands, records, review queue (serving/inspection.py)
        self.book = TrafficBook()  # canary and shadow counts, handed to the rollout controller
        self._in_flight = 0  # score requests between arrival and answer; the shadow waits for 0
        self.shadow = ShadowScorer(self.book, self.cfg.rollout.shadow.queue if self.cfg.rollout.shadow else 1,
                                   on_result=self._shadow_result, idle=lambda: self._in_flight == 0)
        self.holder = ModelHolder(self.cfg, self._link(), _replica_id(), on_poll=self._hand_over,
                                  reserved_bytes=self.cfg.ray_actor_options.memory, forward=self.forward)
        # built per replica, not as a class decorator: max_concurrent_batches is fixed when the
        # batch queue is made, and only the config knows it
        self.batched_score = serve.batch(max_batch_size=self.cfg.max_batch_size,
                                         batch_wait_timeout_s=self.cfg.batch_wait_timeout_s,
                                         max_concurrent_batches=self.cfg.max_concurrent_batches)(self._score_batch)
        # forwards at once, batches and lone requests together (a lone request skips Serve's batch queue)
        self._forwards = asyncio.Semaphore(self.cfg.max_concurrent_batches)

    def __del__(self) -> None:
        holder = getattr(self, "holder", None)
        if holder is not None:
            holder.stop()
        inspection = getattr(self, "inspection", None)
        if inspection is not None:
            inspection.stop()

    def _link(self):
        if self.cfg.model_dir is not None:  # a folder: one version, nothing to follow
            from plantad.tracking.model_source import resolve_model

            return FixedLink(resolve_model(self.cfg.model_uri, None))
        return ActorLink(self.cfg)

    def _aliases(self) -> tuple[str, ...]:
        """The registry aliases the rollout follows (champion, last-known-good, shadow, canary)."""
        r = self.cfg.rollout
        return (self.cfg.model_alias, r.last_known_good_alias, *((r.shadow.alias,) if r.shadow else ()),
                *((r.canary.alias,) if r.canary else ()))

    def _hand_over(self) -> None:
        """After each poll of the controller: this replica's traffic counts go to it."""
        canary, shadow, pair = self.book.take()
        if canary or shadow:
            self.holder.link.add_traffic(canary, shadow, pair)

    def check_health(self) -> None:
        """Serve's periodic health check: exports the served version and the swap state. A failing
        swap leaves the old version serving, so the replica stays healthy; a dead follower does not."""
        current = self.holder.current
        self.metrics.holder_state(current.ref.name, current.ref.version, self.holder.last_error() is not None)
        self.metrics.rollout_state(self.holder.serving_last_known_good, self.holder.behind_for(),
                                   self.shadow.dropped)
        if not self.holder.alive:
            raise RuntimeError("the thread that follows the rollout controller died")

    async def _score_batch(self, jobs: list[ScoreJob]) -> list[ScoredJob]:
        # read once: each job is scored by one version (the champion, or the canary on its lines)
        current, canary, declared = self.holder.current, self.holder.canary, self.holder.declared
        self.metrics.version(current.ref.name, current.ref.version)
        self.metrics.batch_requests.observe(len(jobs))
        self.metrics.batch_images.observe(sum(len(j.images) for j in jobs))
        on_canary = [canary is not None and canary_serves(declared, j.line) for j in jobs]
        async with self._forwards:
            if not any(on_canary):
                return await self.forward.call(score_jobs, current, jobs)
            out: list[ScoredJob | None] = [None] * len(jobs)
            for predictor, flag in ((current, False), (canary, True)):
                idx = [i for i, c in enumerate(on_canary) if c == flag]
                if idx:
                    for i, done in zip(idx, await self.forward.call(score_jobs, predictor, [jobs[i] for i in idx])):
                        out[i] = done
            return out

    async def _answer(self, route: str, request: Request, handler: Callable[[], Awaitable[tuple[int, Any]]],
                      auth: bool = True) -> JSONResponse:
        """Run a route: API key, handler, ApiError -> {"error"}, metrics by route and status."""
        started = time.perf_counter()
        try:
            if auth:
                check_bearer(request.headers.get("authorization"), self.keys)
            status, body = await handler()
        except ApiError as exc:
            status, body = exc.status, {"error": exc.message}
        except Exception:  # a bug or a failed batch: a counted JSON 500 naming a request id, logged under it
            status, body = 500, internal_error(route)
        self.metrics.request(route, status, time.perf_counter() - started)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(body, status_code=status, headers=headers)

    async def _score(self, images: list, threshold: float | None, heatmap: bool, line: str) -> ScoredJob:
        declared = self.holder.declared
        role = "canary" if declared.canary and canary_serves(declared, line) else "champion"
        started = time.perf_counter()
        # pre-processed on a decode thread, overlapping the forward that is running now
        version = (self.holder.canary if role == "canary" else None) or self.holder.current
        images = await on_executor(self.decoder, prepare, images, version.transform)
        job = ScoreJob(images, threshold, heatmap, line)
        # nothing else queued or scoring on this replica: a batch of one now, not after the batch window
        lone = self.cfg.idle_skips_batch_wait and self._in_flight == 0
        self._in_flight += 1
        try:
            scored = (await self._score_batch([job]))[0] if lone else await self.batched_score(job)
        except Exception:
            if declared.canary:
                self.book.failed(role, len(images))
            raise
        finally:
            self._in_flight -= 1
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        for s in scored.scores:
            self.metrics.scored(s.probability, s.is_anomalous, line)
        predictor = scored.predictor
        if declared.canary:
            self.book.scored("canary" if predictor is self.holder.canary else "champion", scored.scores)
        self._offer_shadow(line, images, scored, elapsed_ms)
        try:  # the coordinates go into the line's window and into the part records
            drift = self.drift.project(predictor.drift_reference, scored.scores)
            due = self.drift.record(line, predictor.ref.version, predictor.drift_reference, scored.scores,
                                    projected=drift)
        except Exception:  # line health must never fail scoring: a broken reference is logged, not answered
            log.exception("recording line %r for the drift test failed", line)
            drift, due = None, False
        if due:
            # off the event loop and not awaited: the request that makes a test due does not wait for it
            task = asyncio.ensure_future(asyncio.to_thread(self._drift_test, line, predictor))
            self._drift_tests.add(task)
            task.add_done_callback(self._drift_tests.discard)
        return dataclasses.replace(scored, drift=drift)

    def _offer_shadow(self, line: str, images: list, scored: ScoredJob, elapsed_ms: float) -> None:
        """Queue the images for the shadow version (scored after this answer is sent), on its lines."""
        shadow, cfg = self.holder.shadow, self.cfg.rollout.shadow
        if shadow is None or cfg is None or scored.predictor is self.holder.canary:
            return
        if shadow_scores(self.holder.declared, line, cfg.share):
            pair = (shadow.ref.version, scored.predictor.ref.version)
            job = ShadowJob(shadow, line, images, scored.scores, elapsed_ms, pair)
            if not self.shadow.offer(job):
                self.metrics.shadow_dropped.inc(len(images), tags={"line": line})

    def _shadow_result(self, job: ShadowJob, scores: list, shadow_ms: float) -> None:
        self.metrics.shadow_latency_ms.observe(job.champion_ms, tags={"line": job.line, "role": "champion"})
        self.metrics.shadow_latency_ms.observe(shadow_ms, tags={"line": job.line, "role": "shadow"})
        for role, decided in (("champion", job.champion), ("shadow", scores)):
            rejects = sum(1 for s in decided if s.is_anomalous)
            if rejects:
                self.metrics.shadow_rejects.inc(rejects, tags={"line": job.line, "role": role})
        for a, b in zip(job.champion, scores):
            self.metrics.shadow_images.inc(tags={"line": job.line,
                                                 "agreement": "agree" if a.is_anomalous == b.is_anomalous
                                                 else "disagree"})

    def _drift_test(self, line: str, predictor: Predictor) -> None:
        try:
            result = self.drift.test(line, predictor.ref.version, predictor.drift_reference)
        except Exception:  # a bug in the test must not fail scoring; it is logged with its traceback
            log.exception("drift test of line %r failed", line)
            return
        if result is not None:
            self.metrics.drift(line, result)

    @app.post("/score", openapi_extra=SCORE_BODY, summary="Score one or more images (multipart or base64 JSON)")
    async def score(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            parsed = await parse_score_request(request, self.cfg, self.decoder)
            ids = part_ids(request.headers.get("x-part-id"), len(parsed.images))
            line = self.lines.label(parsed.line)
            for item in parsed.images:
                if item.decoded is None:
                    self.metrics.image_errors.inc(tags={"status": str(item.status), "line": line})
            good = [item.decoded.image for item in parsed.images if item.decoded is not None]
            scored = await self._score(good, parsed.threshold, parsed.heatmap, line) if good else None
            answer = await asyncio.to_thread(native_answer, parsed.images, scored, parsed.heatmap,
                                             self.holder.current, self.cfg.max_heatmap_side)
            if scored is not None:  # the line's OK / REVIEW / NG band, the part records
                await asyncio.to_thread(self.inspection.decide, parsed.images, answer, parsed.line, line, ids,
                                        scored.predictor, scored.drift)
            return request_status(parsed.images), answer
        return await self._answer("score", request, run)

    @app.get("/healthz", summary="Liveness (no API key needed)")
    async def healthz(self, request: Request) -> JSONResponse:
        return await self._answer("healthz", request, self._ok({"status": "ok"}), auth=False)

    @app.get("/readyz", summary="Readiness: a model is loaded and it is the declared one (or not for long)")
    async def readyz(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            behind, bound = self.holder.behind_for(), self.cfg.rollout.declared_bound_s
            body = {"ready": behind <= bound, **model_block(self.holder.current),
                    "declared_champion": self.holder.declared.champion}
            if behind > bound:
                body["error"] = (f"serving v{self.holder.current.ref.version} for {behind:.0f} s while the "
                                 f"declared champion is v{self.holder.declared.champion} "
                                 f"(serve.rollout.declared_bound_s {bound:g})")
                return 503, body
            return 200, body
        return await self._answer("readyz", request, run)

    @app.get("/rollout", summary="Declared rollout state and each replica's actual version, load state, error")
    async def rollout(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            return 200, await asyncio.to_thread(self.holder.link.status)
        return await self._answer("rollout", request, run)

    @app.post("/rollout/report", summary="Write the shadow comparison to the shadow version in the registry now")
    async def rollout_report(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            link = self.holder.link
            if not isinstance(link, ActorLink):
                raise ApiError(409, "a model folder is served: there is no shadow version")
            await asyncio.to_thread(self._hand_over)
            try:
                return 200, await asyncio.to_thread(link.write_shadow_report)
            except ValueError as exc:
                raise ApiError(409, str(exc)) from exc
        return await self._answer("rollout_report", request, run)

    @app.get("/model", summary="Served version, data version, metrics, teacher, load time, last swap error")
    async def model(self, request: Request) -> JSONResponse:
        return await self._answer("model", request, self._ok({**self.holder.status(),
                                                               "line_health": self.drift.status(
                                                                   self.holder.current.drift_reference)}))

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        return await self._answer("openapi", request, self._ok(app.openapi()))

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        check = await self._answer("docs", request, self._ok({}))
        if check.status_code != 200:
            return check
        root = request.scope.get("root_path", "").rstrip("/")
        # assets from the package (fastapi-offline ships them), not a CDN: the line PC may have no internet
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=app.title,
                                   swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/docs/assets/favicon.png")

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(self, name: str) -> Response:
        if name not in SWAGGER_FILES:
            return JSONResponse({"error": f"no docs asset {name!r}"}, status_code=404)
        return Response(swagger_asset(name), media_type=SWAGGER_FILES[name],
                        headers={"Cache-Control": "public, max-age=86400"})

    # --- the line's window: inspection page, bands, review queue, recent traffic (serving/inspection.py) ---

    @app.get("/", response_class=HTMLResponse, summary="Inspection page (HTML; its API calls ask for a key)")
    async def page(self, request: Request) -> HTMLResponse:
        return HTMLResponse(page_html(request.scope.get("root_path", "")))

    def _who(self, request: Request) -> str:
        return key_id(request.headers.get("authorization"), self.keys)

    @app.get("/bands", summary="Every line's OK / REVIEW / NG band, the default and the calibrated threshold")
    async def bands(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            return self.inspection.bands_status(self.holder.current)
        return await self._answer("bands", request, run)

    @app.put("/bands/{line}", summary="Set a line's band {low, high} (line `default`: every line without one); audited")
    async def set_band(self, line: str, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            doc = parse_json_body(await read_body(request, WEBHOOK_MAX_BYTES))
            return await asyncio.to_thread(self.inspection.save_band, line, doc, self._who(request),
                                           self.holder.current)
        return await self._answer("set_band", request, run)

    @app.get("/bands/audit", summary="Band changes, newest first: when, who (API key id), line, old, new, version")
    async def band_audit(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            q = request.query_params
            return await asyncio.to_thread(self.inspection.audit, query_line(q.get("line")),
                                           query_limit(q.get("limit")))
        return await self._answer("band_audit", request, run)

    @app.get("/review/queue", summary="Stored REVIEW / NG (and sampled OK) images not yet reviewed, newest first")
    async def review_queue(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            q = request.query_params
            return await asyncio.to_thread(self.inspection.queue, query_line(q.get("line")),
                                           query_limit(q.get("limit")))
        return await self._answer("review_queue", request, run)

    @app.get("/review/images/{sha}", summary="A stored part image (PNG) by its sha256")
    async def review_image(self, sha: str, request: Request) -> Response:
        image: list[bytes] = []

        async def run() -> tuple[int, Any]:
            image.append(await asyncio.to_thread(self.inspection.image, sha))
            return 200, {}
        answer = await self._answer("review_image", request, run)
        return Response(image[0], media_type="image/png") if image else answer

    @app.post("/review", summary="An operator's verdict on a stored image: normal, or defective with a defect name")
    async def review(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            doc = parse_json_body(await read_body(request, WEBHOOK_MAX_BYTES))
            return await asyncio.to_thread(self.inspection.review, doc, self._who(request))
        return await self._answer("review", request, run)

    @app.get("/review/verdicts", summary="Operators' verdicts, newest first (the review audit trail)")
    async def review_verdicts(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            return await asyncio.to_thread(self.inspection.reviews, query_limit(request.query_params.get("limit")))
        return await self._answer("review_verdicts", request, run)

    @app.get("/traffic", summary="This replica's last scored images (serve.recent_traffic), decision rates")
    async def traffic(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            q = request.query_params
            return self.inspection.recent(query_line(q.get("line")), q.get("decision") or None,
                                          query_limit(q.get("limit")))
        return await self._answer("traffic", request, run)

    @app.get("/inspection", summary="Page settings (records, traffic, lines, MLflow UI) and store write errors, drops")
    async def inspection_info(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            return self.inspection.info(bool(self.keys), self.holder.current)
        return await self._answer("inspection", request, run)

    @staticmethod
    def _ok(body: Any) -> Callable[[], Awaitable[tuple[int, Any]]]:
        async def run() -> tuple[int, Any]:
            return 200, body
        return run

    @app.post("/webhooks/mlflow", summary="MLflow 3 registry webhook (HMAC-signed): check the alias now")
    async def webhook(self, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            payload = await read_body(request, WEBHOOK_MAX_BYTES)
            verify_webhook(self.webhook_secret, {k.lower(): v for k, v in request.headers.items()}, payload)
            doc = parse_json_body(payload)
            data = doc.get("data", doc) if isinstance(doc.get("data", doc), dict) else {}
            ours = data.get("name") == self.cfg.model_name and data.get("alias") in (None, *self._aliases())
            if ours:  # the controller reads the registry now; every replica follows within rollout.follow_s
                await asyncio.to_thread(self.holder.check_now)
            return 200, {"check": "scheduled" if ours else "ignored"}
        # signed by the MLflow server, not by an API key (MLflow cannot send one)
        return await self._answer("webhook", request, run, auth=False)

    # Open Inference Protocol (KServe v2 / Triton HTTP)
    @app.get("/v2", summary="Open Inference Protocol: server metadata")
    async def v2_server(self, request: Request) -> JSONResponse:
        from plantad import __version__

        return await self._answer("v2", request, self._ok({"name": "plantad", "version": __version__,
                                                           "extensions": []}))

    @app.get("/v2/health/live")
    async def v2_live(self, request: Request) -> JSONResponse:
        return await self._answer("v2_live", request, self._ok({"live": True}), auth=False)

    @app.get("/v2/health/ready")
    async def v2_ready(self, request: Request) -> JSONResponse:
        return await self._answer("v2_ready", request, self._ok({"ready": True}))

    def _v2_model(self, name: str) -> None:
        served = self.holder.current.ref.name or self.cfg.model_name
        if name != served:
            raise ApiError(400, f"unknown model {name!r}; this server serves {served!r}")

    @app.get("/v2/models/{name}", summary="Open Inference Protocol: model metadata")
    async def v2_metadata(self, name: str, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            self._v2_model(name)
            current = self.holder.current
            outputs = [{"name": o, "datatype": v2_datatype(o), "shape": [-1]} for o in V2_OUTPUTS]
            runtime = current.info()["runtime"]  # what runs the forward: "torch" or "openvino <precision>"
            return 200, {"name": name, "versions": [current.ref.version],
                         "platform": "openvino" if runtime.startswith("openvino") else "pytorch",
                         "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}], "outputs": outputs,
                         "parameters": {"threshold": current.threshold, "runtime": runtime}}
        return await self._answer("v2_metadata", request, run)

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(self, name: str, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            self._v2_model(name)
            return 200, {"name": name, "ready": True}
        return await self._answer("v2_ready", request, run)

    @app.post("/v2/models/{name}/infer", openapi_extra=V2_BODY, summary="Open Inference Protocol: infer")
    async def v2_infer(self, name: str, request: Request) -> JSONResponse:
        async def run() -> tuple[int, Any]:
            self._v2_model(name)
            doc = parse_json_body(await read_body(request, self.cfg.max_request_bytes))
            data, params, wanted = v2_images(doc)
            if len(data) > self.cfg.max_images_per_request:
                raise ApiError(413, f"{len(data)} images is over serve.max_images_per_request "
                                    f"({self.cfg.max_images_per_request})")
            threshold = parse_threshold(params.get("threshold"), "parameters", text=False)
            items = await on_executor(self.decoder, decode_base64_all, data, "image", self.cfg)
            bad = [item for item in items if item.decoded is None]
            if bad:  # v2 has no per-element errors: the first bad image answers the request
                raise ApiError(413 if bad[0].status == 413 else 400, bad[0].error or "bad image")
            named = parse_line(params.get("line"), "parameters")
            line = self.lines.label(named)
            ids = part_ids(request.headers.get("x-part-id"), len(items))
            scored = await self._score([item.decoded.image for item in items], threshold, False, line)
            decisions, band = await asyncio.to_thread(self.inspection.decide_v2, items, scored.scores, named, line,
                                                      ids, scored.predictor, scored.drift)
            # the runtime that scored (torch, or the exported graph "openvino <precision>") and the band
            return 200, {**v2_answer(scored, wanted, doc.get("id"), decisions),
                         "parameters": {"runtime": scored.predictor.info()["runtime"], **v2_band_parameters(band)}}
        return await self._answer("v2_infer", request, run)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application from the `serve` settings (deploy/serve_config.yaml's args, or params.yaml)."""
    cfg = serve_config_from_dict(dict(args or {}), "serve_config args")
    if cfg.tracking_uri is None and cfg.model_dir is None:  # pinned here, so every replica uses the same store
        cfg = cfg.model_copy(update={"tracking_uri": os.environ.get("MLFLOW_TRACKING_URI") or None})
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "ray_actor_options": cfg.ray_actor_options.model_dump(exclude_none=True),  # memory None: no reservation
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    return ScoringServer.options(**options).bind(json.loads(cfg.model_dump_json()))
