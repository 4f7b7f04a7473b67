"""Scoring jobs (one request's decoded images) and how their results are answered: the native JSON
and the Open Inference Protocol (KServe v2) outputs. Scores come from `Predictor.score` only."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from PIL import Image

from plantad.serving.inputs import ApiError, ImageInput
from plantad.serving.predictor import ImageScore, Predictor, Prepared
from plantad.serving.render import anomaly_box, heatmap_overlay_png


@dataclass(frozen=True)
class ScoreJob:
    images: list[Image.Image | Prepared]  # a replica's are prepared on its decode threads
    threshold: float | None
    with_maps: bool
    line: str = "unknown"  # routes the job to the canary on the canary's lines


@dataclass(frozen=True)
class ScoredJob:
    scores: list[ImageScore]
    predictor: Predictor  # the version that scored all of this job's images
    drift: list | None = None  # per image, its drift coordinates ((D,) or None), set by the app for the records


def score_jobs(predictor: Predictor, jobs: list[ScoreJob]) -> list[ScoredJob]:
    """Score a Serve batch of jobs with one Predictor: one `score` call per (threshold, maps) group."""
    groups: dict[tuple[float | None, bool], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.threshold, job.with_maps), []).append(i)
    out: list[list[ImageScore]] = [[] for _ in jobs]
    for (threshold, with_maps), members in groups.items():
        images = [img for i in members for img in jobs[i].images]
        scores = iter(predictor.score(images, threshold=threshold, with_maps=with_maps))
        for i in members:
            out[i] = [next(scores) for _ in jobs[i].images]
    return [ScoredJob(scores, predictor) for scores in out]


def model_block(predictor: Predictor) -> dict[str, object]:
    return {"name": predictor.ref.name, "version": predictor.ref.version, "alias": predictor.ref.alias,
            "threshold": predictor.threshold}


def image_entry(item: ImageInput, score: ImageScore, predictor: Predictor, heatmap: bool,
                max_heatmap_side: int) -> dict[str, object]:
    """One scored image of the native answer; the box is in the original image's pixels, the heatmap
    at that size or scaled down to at most `max_heatmap_side` a side (serve.max_heatmap_side)."""
    assert item.decoded is not None
    entry: dict[str, object] = {
        "name": item.name, "status": 200,
        "probability": score.probability, "is_anomalous": score.is_anomalous, "threshold": score.threshold,
        "p_local": score.p_local, "p_semantic": score.p_semantic,
        "local_score": score.local_score, "semantic_score": score.semantic_score,
        "model_version": predictor.ref.version,
        "width": item.decoded.width, "height": item.decoded.height, "converted": item.decoded.converted,
    }
    if heatmap and score.anomaly_map is not None:
        png = heatmap_overlay_png(item.decoded.image, score.anomaly_map, predictor.lambda_local,
                                  max_side=max_heatmap_side)
        entry["heatmap_png"] = base64.b64encode(png).decode()
        entry["box"] = anomaly_box(score.anomaly_map, item.decoded.width, item.decoded.height)
    return entry


def request_status(items: list[ImageInput]) -> int:
    """200 when at least one image scored; else the images' common 4xx, or 400 when they differ."""
    if any(item.decoded is not None for item in items):
        return 200
    statuses = {item.status for item in items}
    return statuses.pop() if len(statuses) == 1 else 400


def native_answer(items: list[ImageInput], scored: ScoredJob | None, heatmap: bool,
                  current: Predictor, max_heatmap_side: int) -> dict[str, object]:
    """{"model", "results": one entry per image in request order, "scored", "failed"}."""
    scores = iter(scored.scores) if scored else iter(())
    predictor = scored.predictor if scored else current
    results = [image_entry(item, next(scores), predictor, heatmap, max_heatmap_side) if item.decoded is not None
               else {"name": item.name, "status": item.status, "error": item.error} for item in items]
    n_ok = sum(1 for item in items if item.decoded is not None)
    return {"model": model_block(predictor), "results": results, "scored": n_ok, "failed": len(items) - n_ok}


V2_OUTPUTS = ("probability", "is_anomalous", "decision", "threshold", "p_local", "p_semantic", "local_score",
              "semantic_score")


def v2_datatype(output: str) -> str:
    """BOOL for the boolean, BYTES for the band decision (OK / REVIEW / NG), FP32 for the numbers."""
    return {"is_anomalous": "BOOL", "decision": "BYTES"}.get(output, "FP32")


def v2_band_parameters(band: dict[str, object]) -> dict[str, object]:
    """The band of the answer's `decision` as flat v2 parameters (the protocol's values are scalars):
    band_low, band_high, band_source (line, default or calibrated), band_version, and the saved rates."""
    rates = band.get("rates") or {}
    return {"band_low": band["low"], "band_high": band["high"], "band_source": band["source"],
            "band_version": band["version"], **{f"band_{k}": v for k, v in rates.items()}}


def v2_images(doc: dict[str, object]) -> tuple[list[str], dict[str, object], list[str]]:
    """(base64 strings, parameters, output names) of a v2 infer request; 400 names what is wrong."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, "v2 request needs 'inputs': [{\"name\": \"image\", \"datatype\": \"BYTES\", ...}]")
    found = [i for i in inputs if isinstance(i, dict) and i.get("name") == "image"]
    if len(found) != 1:
        raise ApiError(400, "v2 request needs exactly one input named 'image'")
    image = found[0]
    if image.get("datatype") != "BYTES":
        raise ApiError(400, f"input 'image' must have datatype BYTES, got {image.get('datatype')!r}")
    data = image.get("data")
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise ApiError(400, "input 'image' data must be a list of base64 strings")
    shape = image.get("shape")
    if not isinstance(shape, list) or not shape or shape[0] != len(data):
        raise ApiError(400, f"input 'image' shape {shape!r} does not match its {len(data)} data elements")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "'parameters' must be an object")
    wanted = [o.get("name") for o in doc.get("outputs") or [] if isinstance(o, dict)] or list(V2_OUTPUTS)
    unknown = [w for w in wanted if w not in V2_OUTPUTS]
    if unknown:
        raise ApiError(400, f"unknown outputs {unknown}; this model has {list(V2_OUTPUTS)}")
    return data, params, wanted


def v2_answer(scored: ScoredJob, wanted: list[str], request_id: object, decisions: list[str]) -> dict[str, object]:
    """FP32, BOOL and BYTES (the band decision) output tensors of shape [N]; a branch the model lacks
    is left out."""
    n = len(scored.scores)
    outputs = []
    for name in wanted:
        values = decisions if name == "decision" else [getattr(s, name) for s in scored.scores]
        if any(v is None for v in values):
            continue
        dtype = v2_datatype(name)
        cast = {"BOOL": bool, "BYTES": str, "FP32": float}[dtype]
        outputs.append({"name": name, "datatype": dtype, "shape": [n], "data": [cast(v) for v in values]})
    answer: dict[str, object] = {"model_name": scored.predictor.ref.name, "model_version": scored.predictor.ref.version,
                                 "outputs": outputs}
    if request_id is not None:
        answer["id"] = request_id
    return answer
