"""API keys (Bearer) for every route but liveness, and MLflow webhook signature checks.

Keys and the webhook secret come from the replica's environment or a file, never from
params.yaml: a settings file in git must not hold secrets.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from pathlib import Path

from plantad.config import ServeConfig
from plantad.serving.inputs import ApiError

# MLflow 3 webhook headers (mlflow/webhooks/constants.py); the signature is "v1,<base64 HMAC-SHA256>"
SIGNATURE_HEADER = "x-mlflow-signature"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
DELIVERY_ID_HEADER = "x-mlflow-delivery-id"
MAX_WEBHOOK_AGE_S = 300  # older deliveries are refused (replay protection)


class SecretError(ValueError):
    """A configured key or secret file that cannot be read."""


def _read_secret_file(path: str, key: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SecretError(f"serve.{key} = {path!r} cannot be read: {exc}") from exc


def load_api_keys(cfg: ServeConfig) -> frozenset[str]:
    """Keys from env `serve.api_keys_env` (comma-separated) and file `serve.api_keys_file` (one a line)."""
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",")]
    if cfg.api_keys_file:
        keys += [line.strip() for line in _read_secret_file(cfg.api_keys_file, "api_keys_file").splitlines()]
    return frozenset(k for k in keys if k and not k.startswith("#"))


def load_webhook_secret(cfg: ServeConfig) -> str | None:
    secret = os.environ.get(cfg.webhook_secret_env, "").strip()
    if cfg.webhook_secret_file:
        secret = _read_secret_file(cfg.webhook_secret_file, "webhook_secret_file").strip()
    return secret or None


def check_bearer(authorization: str | None, keys: frozenset[str]) -> None:
    """Raise 401 unless `Authorization: Bearer <key>` holds one of `keys` (no keys: open)."""
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
    token = token.strip()
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        raise ApiError(401, "invalid API key")


def webhook_signature(secret: str, delivery_id: str, timestamp: str, payload: bytes) -> str:
    """MLflow 3's scheme: "v1," + base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{payload}"))."""
    signed = f"{delivery_id}.{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_webhook(secret: str | None, headers: dict[str, str], payload: bytes, now: float | None = None) -> None:
    """Raise 401 unless the delivery is signed with `secret` and at most MAX_WEBHOOK_AGE_S old."""
    if secret is None:
        raise ApiError(404, "webhook receiver is off: set the secret in serve.webhook_secret_env or _file")
    signature = headers.get(SIGNATURE_HEADER, "")
    delivery_id = headers.get(DELIVERY_ID_HEADER, "")
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    if not (signature and delivery_id and timestamp.isdigit()):
        raise ApiError(401, "webhook without X-MLflow-Signature, X-MLflow-Delivery-Id and X-MLflow-Timestamp")
    if abs((time.time() if now is None else now) - int(timestamp)) > MAX_WEBHOOK_AGE_S:
        raise ApiError(401, f"webhook timestamp {timestamp} is more than {MAX_WEBHOOK_AGE_S} s away from now")
    expected = webhook_signature(secret, delivery_id, timestamp, payload)
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise ApiError(401, "webhook signature does not match the configured secret")
