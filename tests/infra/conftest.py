"""Storage fixtures for tests/infra (move these imports to tests/conftest.py to share them)."""

from infra.fixtures import moto_s3, ray_local, tmp_git_dvc_repo  # noqa: F401
