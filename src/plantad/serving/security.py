"""API keys (Bearer) for every route but liveness, MLflow webhook signature checks, and what keeps
a replica closed: no open serving on a non-loopback host, no replica listener beyond its node IP.

Keys and the webhook secret come from the replica's environment or a file, never from
params.yaml: a settings file in git must not hold secrets. Keys given to `plantad serve` travel
to the replicas as SHA-256 digests in the cluster's internal key-value store (GCS): not in the
app's args (the Serve config, shown by the dashboard), not in a runtime_env (shown per actor).
Replicas keep only digests, so no key is held in a replica's memory or answers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path

from plantad.cluster import is_loopback
from plantad.config import ServeConfig
from plantad.serving.inputs import ApiError

log = logging.getLogger(__name__)
KEYS_NAMESPACE = "plantad"  # Ray internal KV namespace of the published key digests

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


def read_api_keys(cfg: ServeConfig) -> frozenset[str]:
    """Keys from env `serve.api_keys_env` (comma-separated) and file `serve.api_keys_file` (one a line)."""
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",")]
    if cfg.api_keys_file:
        keys += [line.strip() for line in _read_secret_file(cfg.api_keys_file, "api_keys_file").splitlines()]
    return frozenset(k for k in keys if k and not k.startswith("#"))


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _kv_key(app_name: str) -> bytes:
    return f"api-key-digests/{app_name}".encode()


def publish_api_keys(app_name: str, keys: frozenset[str]) -> None:
    """Store the digests of `keys` for app `app_name` in the cluster's internal KV (none: remove them),
    where every replica of the app, started now or later on any node, reads them."""
    from ray.experimental import internal_kv

    if keys:
        value = json.dumps(sorted(key_digest(k) for k in keys)).encode()
        internal_kv._internal_kv_put(_kv_key(app_name), value, overwrite=True, namespace=KEYS_NAMESPACE)
    else:
        internal_kv._internal_kv_del(_kv_key(app_name), namespace=KEYS_NAMESPACE)


def published_digests(app_name: str) -> frozenset[str]:
    """The digests `plantad serve` published for `app_name`; none outside a Ray worker or driver."""
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return frozenset()
    value = internal_kv._internal_kv_get(_kv_key(app_name), namespace=KEYS_NAMESPACE)
    return frozenset(json.loads(value)) if value else frozenset()


def load_api_keys(cfg: ServeConfig) -> frozenset[str]:
    """Digests of every key a replica accepts: its env and file keys and those published for its app."""
    return frozenset(key_digest(k) for k in read_api_keys(cfg)) | published_digests(cfg.app_name)


def check_auth_closed(cfg: ServeConfig, have_keys: bool) -> None:
    """Refuse to serve without API keys on a host other than loopback, unless the settings say so."""
    if have_keys or is_loopback(cfg.host) or cfg.allow_unauthenticated:
        return
    raise SecretError(f"serve.host is {cfg.host} (reachable beyond this machine) and no API key is configured: "
                      f"set keys in ${cfg.api_keys_env} or serve.api_keys_file, or set "
                      "serve.allow_unauthenticated: true to serve without them")


def load_webhook_secret(cfg: ServeConfig) -> str | None:
    secret = os.environ.get(cfg.webhook_secret_env, "").strip()
    if cfg.webhook_secret_file:
        secret = _read_secret_file(cfg.webhook_secret_file, "webhook_secret_file").strip()
    return secret or None


def check_bearer(authorization: str | None, digests: frozenset[str]) -> None:
    """Raise 401 unless `Authorization: Bearer <key>` holds a key whose digest is in `digests` (none: open)."""
    if not digests:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
    presented = key_digest(token.strip()).encode()
    if not any(hmac.compare_digest(presented, d.encode()) for d in digests):
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


def bind_replica_grpc_to_node_ip() -> str:
    """Make this replica's inter-deployment gRPC server listen on the node's IP, not on every
    interface; returns that IP. Call it in the replica's constructor: Serve starts that server after
    the constructor (ray.serve._private.replica, Ray 2.60: `[::]:0`). Proxies and handles dial it at
    the node IP, so a loopback node's replica is then reachable from this machine only."""
    import ray
    from ray.serve._private import replica

    node_ip = ray.util.get_node_ip_address()
    original = replica.add_port_to_grpc_server
    if getattr(original, "plantad_node_ip", None) == node_ip:
        return node_ip
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def on_node_ip(server, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{host}:{address.rpartition(':')[2]}"
        return original(server, address)

    on_node_ip.plantad_node_ip = node_ip  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_node_ip
    log.info("Serve's inter-deployment gRPC server of this replica listens on %s", node_ip)
    return node_ip
