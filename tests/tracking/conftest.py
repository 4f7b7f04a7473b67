"""Tracking fixtures for tests/tracking (move these imports to tests/conftest.py to share them)."""

from infra.fixtures import mlflow_server, moto_s3  # noqa: F401
