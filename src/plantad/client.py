"""Python client of the online scoring service (httpx): what scripts and line PCs call.

    with ScoringClient("http://127.0.0.1:8000", api_key=...) as c:
        answer = c.score(["part1.png", "part2.png"], heatmap=True)
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx


class ClientError(RuntimeError):
    """The service refused a request or could not be reached; names the URL and the server's error."""

    def __init__(self, url: str, status: int | None, message: str) -> None:
        self.url, self.status = url, status
        super().__init__(f"{url}: {'HTTP ' + str(status) + ': ' if status else ''}{message}")


class ScoringClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(self.url + path, None, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code not in ok:
            try:
                doc = response.json()
            except ValueError:
                doc = {}
            per_image = "; ".join(r.get("error", "") for r in doc.get("results", []) if isinstance(r, dict))
            message = doc.get("error") or per_image or response.text
            raise ClientError(self.url + path, response.status_code, message)
        return response

    def score(self, images: list[str | Path | bytes], threshold: float | None = None,
              heatmap: bool = False, line: str | None = None) -> dict[str, Any]:
        """POST /score as multipart: one entry per image in order (scored, or with its 4xx error).

        A request where no image could be scored raises ClientError with the server's message."""
        files = []
        for i, img in enumerate(images):
            data, name = (img, f"image{i}") if isinstance(img, bytes) else (Path(img).read_bytes(), Path(img).name)
            files.append(("files", (name, data, "application/octet-stream")))
        params: dict[str, Any] = {"heatmap": str(heatmap).lower()}
        if threshold is not None:
            params["threshold"] = threshold
        if line is not None:
            params["line"] = line
        return self._call("POST", "/score", files=files, params=params).json()

    def model(self) -> dict[str, Any]:
        return self._call("GET", "/model").json()

    def rollout(self) -> dict[str, Any]:
        return self._call("GET", "/rollout").json()

    def rollout_report(self) -> dict[str, Any]:
        return self._call("POST", "/rollout/report").json()

    def ready(self) -> bool:
        return self._call("GET", "/readyz", ok=(200, 503)).status_code == 200


def save_heatmap(entry: dict[str, Any], out_dir: Path, name: str) -> Path | None:
    """Write an entry's heatmap overlay as <out_dir>/<stem>_heatmap.png; None when it has none."""
    if "heatmap_png" not in entry:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{Path(name).stem}_heatmap.png"
    path.write_bytes(base64.b64decode(entry["heatmap_png"]))
    return path
