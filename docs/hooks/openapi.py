"""MkDocs hook: export the scoring app's OpenAPI schema into the site as reference/openapi.json.

The schema comes from the FastAPI app in plantad.serving.app at build time, so the published file is
always the one the running endpoint serves at /openapi.json. Importing the app starts no Ray cluster.
"""

from __future__ import annotations

import json

from mkdocs.structure.files import File, Files

SCHEMA_PATH = "reference/openapi.json"


def openapi_schema() -> dict:
    from plantad.serving.app import app

    return app.openapi()


def on_files(files: Files, config) -> Files:
    text = json.dumps(openapi_schema(), indent=2, sort_keys=True) + "\n"
    files.append(File.generated(config, SCHEMA_PATH, content=text))
    return files
