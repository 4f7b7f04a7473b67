"""The chaos bench's flaky S3 endpoint, and what bulk scoring's storage layer does behind it."""

from __future__ import annotations

import pytest

from infra.flaky_proxy import FlakyProxy
from plantad.storage import open_location, read_bytes, write_atomic
from plantad.tracking.s3 import StorageError


def test_bulk_storage_rides_out_dropped_requests_and_names_the_endpoint_when_s3_stays_down(moto_s3, monkeypatch):
    monkeypatch.setattr("plantad.storage.S3_ATTEMPTS", 2)  # each attempt is pyarrow's 3 tries
    with FlakyProxy(moto_s3.endpoint_url, seed=3) as proxy:
        loc = open_location(f"s3://{moto_s3.bucket}/flaky-proxy-test", moto_s3.model_copy(
            update={"endpoint_url": proxy.url}))
        proxy.set_faults(drop=0.3, delay=0.0)
        blobs = {f"obj-{i}.bin": bytes([i]) * (1000 + i) for i in range(6)}
        for rel, data in blobs.items():
            write_atomic(loc, rel, data)
        assert {rel: read_bytes(loc, rel) for rel in blobs} == blobs
        assert proxy.counts["drop-before"] + proxy.counts["drop-after"] > 0, proxy.counts  # faults were injected
        proxy.set_faults(drop=1.0, delay=0.0)
        with pytest.raises(StorageError, match=rf"cannot read s3://.*obj-0\.bin at S3 endpoint {proxy.url} after 2"):
            read_bytes(loc, "obj-0.bin")
        with pytest.raises(FileNotFoundError):  # a missing object is not a storage fault: no retries
            proxy.set_faults(drop=0.0, delay=0.0)
            read_bytes(loc, "absent.bin")
