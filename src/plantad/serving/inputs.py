"""Untrusted request bodies to decoded images, under byte and pixel limits, one error per image.

Request-level problems (a body over the limit, an empty body, malformed JSON, a wrong content type,
too many images) raise ApiError and answer the whole request. A problem with one image (bad
base64, not an image, truncated, over a limit) becomes that image's entry; the others are scored.
Images are decoded in request order on the replica's decode threads (as many as its CPUs), under
a budget of decoded pixels per request that each image's header is checked against first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import re
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image

from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from plantad.config import ServeConfig
from plantad.data.images import DecodedImage, ImageDecodeError, ImageTooLarge, decode_untrusted

log = logging.getLogger(__name__)
T = TypeVar("T")
LINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # a Prometheus label value a dashboard can show


class ApiError(Exception):
    """An answer for the whole request: HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def internal_error(route: str) -> dict[str, str]:
    """Body of a 500: a generic message and a request id. The exception and its traceback go to the
    replica's log under that id, never to the client (its text may hold paths, values or code)."""
    from ray.serve.context import _get_serve_request_context

    request_id = _get_serve_request_context().request_id or uuid.uuid4().hex  # Serve's x-request-id
    log.exception("%s failed (request id %s)", route, request_id)
    return {"error": f"internal error: the server's log holds the details under request id {request_id}",
            "request_id": request_id}


def decode_executor(num_cpus: float) -> ThreadPoolExecutor:
    """The replica's decode threads, as many as its CPUs (at least one): concurrent requests wait
    for a thread instead of all decoding large images at once (Python's default pool is sized to the
    node's CPUs, not the replica's)."""
    return ThreadPoolExecutor(max_workers=max(1, math.ceil(num_cpus)), thread_name_prefix="plantad-decode")


async def on_executor(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


@dataclass
class ImageInput:
    """One image of a request: its name and either decoded pixels or an error with a 4xx status."""

    name: str
    decoded: DecodedImage | None = None
    status: int = 200
    error: str | None = None


@dataclass
class ParsedRequest:
    images: list[ImageInput]
    threshold: float | None
    heatmap: bool
    line: str | None = None  # the production line the images come from (metrics are counted per line)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 from Content-Length before reading, or as soon as it passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes "
                                "(serve.max_request_bytes)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes (serve.max_request_bytes)")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise ApiError(400, "empty request body: send images as multipart/form-data or JSON {\"images\": [...]}")
    return body


def decode_one(data: bytes, name: str, cfg: ServeConfig) -> ImageInput:
    """Decode one untrusted image; every failure becomes this image's 4xx entry, never an exception."""
    try:
        return ImageInput(name, decode_untrusted(data, name, cfg.max_image_bytes, cfg.max_image_pixels))
    except ImageTooLarge as exc:
        return ImageInput(name, status=413, error=str(exc))
    except ImageDecodeError as exc:
        return ImageInput(name, status=400, error=str(exc))
    except Exception as exc:  # a third-party decoder failing on hostile bytes must not fail the others
        log.warning("decoder raised %s on %s", type(exc).__name__, name)
        return ImageInput(name, status=400, error=f"cannot decode image {name}: {type(exc).__name__}: {exc}")


def header_pixels(data: bytes) -> int | None:
    """width x height from the image's header, no pixel decoded; None when the header cannot be
    read (decode_one then names the problem)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # hostile bytes: any decoder error, reported by decode_one for this image
        return None
    return width * height


def decode_all(named: list[tuple[str, bytes | ImageInput]], cfg: ServeConfig) -> list[ImageInput]:
    """Decode a request's images in order within serve.max_request_pixels: an image whose header
    would take the request past it gets a 413 before it is decoded (entries already failed pass)."""
    used, out = 0, []
    for name, data in named:
        if isinstance(data, ImageInput):
            out.append(data)
            continue
        pixels = header_pixels(data)
        if pixels is not None and used + pixels > cfg.max_request_pixels:
            out.append(ImageInput(name, status=413, error=(
                f"{name}: its {pixels} pixels would bring the request to {used + pixels} decoded pixels, over "
                f"the limit of {cfg.max_request_pixels} per request (serve.max_request_pixels)")))
            continue
        item = decode_one(data, name, cfg)
        if item.decoded is not None:
            used += item.decoded.width * item.decoded.height
        out.append(item)
    return out


def base64_bytes(text: Any, name: str, cfg: ServeConfig) -> bytes | ImageInput:
    """The image bytes of one base64 string, or its 4xx entry."""
    if not isinstance(text, str):
        return ImageInput(name, status=400, error=f"{name}: expected a base64 string, got {type(text).__name__}")
    if len(text) > cfg.max_image_bytes * 4 // 3 + 4:
        return ImageInput(name, status=413, error=f"{name}: base64 of more than the limit of {cfg.max_image_bytes} "
                                                  "bytes (serve.max_image_bytes)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        return ImageInput(name, status=400, error=f"{name}: invalid base64 ({exc})")


def decode_base64_all(texts: list[Any], prefix: str, cfg: ServeConfig) -> list[ImageInput]:
    """Base64 images named `prefix[i]`, decoded in order within the request's pixel budget."""
    return decode_all([(f"{prefix}[{i}]", base64_bytes(t, f"{prefix}[{i}]", cfg)) for i, t in enumerate(texts)], cfg)


def parse_threshold(value: Any, where: str, text: bool = True) -> float | None:
    """A finite number or None; `text`: a string holding one is accepted (form fields, query)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or (isinstance(value, str) and not text):
        raise ApiError(400, f"{where} threshold {value!r} is not a number")
    try:
        thr = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{where} threshold {value!r} is not a number") from None
    if not math.isfinite(thr):
        raise ApiError(400, f"{where} threshold {value!r} is not a finite number")
    return thr


def parse_line(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not LINE_NAME.fullmatch(value):
        raise ApiError(400, f"{where} line {value!r} is not a line name: 1 to 64 letters, digits, '_', '.', ':' "
                            "or '-', starting with a letter or digit")
    return value


def _flag(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def _check_count(n: int, cfg: ServeConfig) -> None:
    if n == 0:
        raise ApiError(400, "no images in the request")
    if n > cfg.max_images_per_request:
        raise ApiError(413, f"{n} images is over the limit of {cfg.max_images_per_request} per request "
                            "(serve.max_images_per_request)")


def parse_json_body(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, f"JSON body must be an object, got {type(doc).__name__}")
    return doc


def from_json(body: bytes, query: dict[str, str], cfg: ServeConfig) -> ParsedRequest:
    """{"images": [base64, ...] or "image": base64, "threshold": t, "heatmap": bool, "line": name}."""
    doc = parse_json_body(body)
    unknown = sorted(set(doc) - {"images", "image", "threshold", "heatmap", "line"})
    if unknown:
        raise ApiError(400, f"unknown JSON keys {unknown}; expected images, image, threshold, heatmap, line")
    items = doc.get("images", [doc["image"]] if "image" in doc else [])
    if not isinstance(items, list):
        raise ApiError(400, f"'images' must be a list of base64 strings, got {type(items).__name__}")
    _check_count(len(items), cfg)
    images = decode_base64_all(items, "images", cfg)
    threshold = parse_threshold(doc.get("threshold", query.get("threshold")), "JSON")
    return ParsedRequest(images, threshold, _flag(doc.get("heatmap", query.get("heatmap", False))),
                         parse_line(doc.get("line", query.get("line")), "JSON"))


async def from_multipart(request: Request, body: bytes, cfg: ServeConfig,
                         executor: ThreadPoolExecutor) -> ParsedRequest:
    """Every file part is an image (any field name); `threshold`, `heatmap`, `line` as fields or query."""
    request._body = body  # starlette replays a cached body to form(): the bytes were counted above
    try:
        form = await request.form(max_files=cfg.max_images_per_request + 1, max_fields=16,
                                  max_part_size=cfg.max_image_bytes + 1)
    except (MultiPartException, HTTPException) as exc:  # HTTPException: starlette's 400 inside an app
        reason = exc.detail if isinstance(exc, HTTPException) else exc.message
        raise ApiError(400, f"malformed multipart body: {reason}") from None
    files = [(key, v) for key, v in form.multi_items() if hasattr(v, "read")]
    _check_count(len(files), cfg)
    uploads = [(upload.filename or f"{key}[{i}]", await upload.read()) for i, (key, upload) in enumerate(files)]
    await form.close()
    # decoding on a decode thread: a large image must not stall the replica's event loop
    images = await on_executor(executor, decode_all, uploads, cfg)
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    threshold = parse_threshold(fields.get("threshold", request.query_params.get("threshold")), "form")
    return ParsedRequest(images, threshold, _flag(fields.get("heatmap", request.query_params.get("heatmap", False))),
                         parse_line(fields.get("line", request.query_params.get("line")), "form"))


async def parse_score_request(request: Request, cfg: ServeConfig, executor: ThreadPoolExecutor) -> ParsedRequest:
    """The request's images decoded on `executor` (decode_executor), its threshold, heatmap flag and line."""
    body = await read_body(request, cfg.max_request_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await from_multipart(request, body, cfg, executor)
    if ctype in ("application/json", ""):
        return await on_executor(executor, from_json, body, dict(request.query_params), cfg)
    raise ApiError(415, f"content type {ctype!r} is not supported: use multipart/form-data or application/json")
