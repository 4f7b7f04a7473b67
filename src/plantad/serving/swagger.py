"""Swagger UI's JavaScript and CSS for /docs from an installed package (fastapi-offline ships them),
so the API page renders on a line PC without internet (FastAPI's default loads them from a CDN)."""

from __future__ import annotations

from importlib import resources

SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


def swagger_asset(name: str) -> bytes:
    """One of SWAGGER_FILES, read from fastapi_offline/static/."""
    return resources.files("fastapi_offline").joinpath("static", name).read_bytes()
