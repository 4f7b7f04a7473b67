"""Exactly-once across runs, without Ray: the output lock (local folder and moto's S3), its stale
rule, the table identity in part names, the manifest-before-tidy order, key normalisation, sizes
from the listing, read retries and decoder exceptions as error rows."""

from __future__ import annotations

import errno
import io
import json
import socket
import subprocess
import threading
import time
import uuid

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
from PIL import Image, ImageFile

from bulk_helpers import bulk_settings, png
from plantad.serving.bulk.job import publish_table
from plantad.serving.bulk.lock import LOCK, Holder, LockHeld, acquire, held_lock, read_holder
from plantad.serving.bulk.plan import (
    MANIFEST, PARTS, SCHEMA, identity_digest, listing_entries, model_sha256, part_bytes, plan_parts, read_results,
    table_identity,
)
from plantad.serving.bulk.scorer import READ_ATTEMPTS, BulkScorer, read_batch
from plantad.storage import Location, list_image_sizes, open_location, write_atomic
from plantad.tracking.model_source import ModelRef, resolve_model


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> tuple[Location, object]:
    """An output table folder, locally or on moto's S3, and the S3 settings."""
    if request.param == "local":
        return open_location(str(tmp_path / "out" / "model-v1"), bulk_settings().s3), bulk_settings().s3
    s3 = request.getfixturevalue("moto_s3")
    return open_location(f"s3://{s3.bucket}/lock-{uuid.uuid4().hex[:8]}/model-v1", s3), s3


def test_two_runs_racing_for_one_output_get_one_lock_and_the_loser_names_the_holder(output):
    out, s3 = output
    barrier, got, refused = threading.Barrier(6), [], []

    def run() -> None:
        barrier.wait()
        try:
            got.append(acquire(out, s3, stale_s=300))
        except LockHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 1 and len(refused) == 5, (got, refused)
    winner = got[0].holder
    assert read_holder(out) == winner
    for message in refused:
        assert f"{out.display(LOCK)} is held by run {winner.run_id} (pid {winner.pid} on {socket.gethostname()}" in message
    got[0].release()
    assert read_holder(out) is None
    acquire(out, s3, stale_s=300).release()  # free again


def _reaped_pid() -> int:
    """The pid of a process of this host that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(output):
    out, s3 = output
    now = time.time()
    write_atomic(out, LOCK, Holder("killed", socket.gethostname(), _reaped_pid(), now, now).body())
    lock = acquire(out, s3, stale_s=300)  # its process on this host has ended: stale at once
    assert read_holder(out).run_id == lock.holder.run_id != "killed"
    lock.release()
    write_atomic(out, LOCK, Holder("silent", "line-pc-7", 4242, now - 900, now - 301).body())
    taken = acquire(out, s3, stale_s=300)  # another host, no heartbeat for longer than stale_s
    taken.release()
    write_atomic(out, LOCK, Holder("alive", "line-pc-7", 4242, now - 900, now - 20).body())
    with pytest.raises(LockHeld, match=r"held by run alive \(pid 4242 on line-pc-7, started .*last heartbeat 2\d s "
                                       r"ago\).*bulk.lock_stale_s=300 s"):
        acquire(out, s3, stale_s=300)
    assert read_holder(out).run_id == "alive"


def test_a_run_whose_lock_was_taken_over_stops_before_its_next_commit(output):
    out, s3 = output
    first = acquire(out, s3, stale_s=300)
    first.heartbeat()
    first.check()  # still its own
    now = time.time()
    write_atomic(out, LOCK, Holder("second", "line-pc-7", 99, now, now).body())  # as a takeover leaves it
    first.heartbeat()
    with pytest.raises(LockHeld, match=rf"lock {out.display(LOCK)} of run {first.holder.run_id} was taken over by "
                                       r"run second \(pid 99 on line-pc-7"):
        first.check()
    first.release()  # not its lock any more: left alone
    assert read_holder(out).run_id == "second"


def test_the_lock_is_released_when_the_run_fails(output):
    out, s3 = output
    with pytest.raises(KeyError):
        with held_lock(out, s3, stale_s=300):
            assert read_holder(out) is not None
            raise KeyError("a failure inside the run")
    assert read_holder(out) is None


def test_settings_that_change_rows_give_other_part_names_and_equal_settings_the_same():
    paths = [f"a/{i}.png" for i in range(10)]

    def names(*extra: str, maps: str | None = None, run_id: str = "r1", sha: str | None = None) -> set[str]:
        m = ModelRef(uri="models:/m/3", name="m", version="3", run_id=run_id)
        identity = table_identity(m, sha, bulk_settings(*extra).bulk, maps)
        return {p.file for p in plan_parts(paths, 4, identity_digest(identity))}

    base = names()
    assert base == names() and len(base) == 3
    for other in (names("bulk.runtime=openvino"), names("bulk.device=cuda"), names("bulk.max_image_bytes=1000"),
                  names("bulk.max_image_pixels=100"), names(maps="s3://b/maps/m-v3"), names(run_id="r2"),
                  names(sha="ab" * 32)):
        assert not other & base
    assert names("bulk.actors=2", "bulk.batch_size=4") == base  # how fast, not what: same table


def test_a_registered_version_s_table_identity_carries_the_sha256_it_was_registered_with():
    tagged = ModelRef(uri="models:/m/3", name="m", version="3", run_id="r1", tags={"model_sha256": "cd" * 32})
    assert model_sha256(tagged) == "cd" * 32
    assert model_sha256(ModelRef(uri="models:/m/3", name="m", version="3", run_id="r1")) is None  # no tag
    same_run_other_files = ModelRef(uri="models:/m/3", name="m", version="3", run_id="r1", tags={"model_sha256": "ef" * 32})
    assert (identity_digest(table_identity(tagged, model_sha256(tagged), bulk_settings().bulk, None))
            != identity_digest(table_identity(same_run_other_files, model_sha256(same_run_other_files),
                                              bulk_settings().bulk, None)))


def _part_rows(rels: list[str]) -> pd.DataFrame:
    rows = pd.DataFrame({"relpath": rels, "path": rels, "error": ["x"] * len(rels)}).reindex(columns=SCHEMA.names)
    return rows.assign(scored_at=pd.Timestamp.now(tz="UTC"))


def test_a_failed_manifest_write_leaves_every_part_of_the_old_table(tmp_path):
    out = open_location(str(tmp_path / "m"), bulk_settings().s3)
    old = plan_parts(["a.png", "b.png"], 1, "11111111")
    for part in old:
        write_atomic(out, f"{PARTS}/{part.file}", part_bytes(_part_rows(list(part.relpaths))))
    new = plan_parts(["a.png", "b.png", "c.png"], 1, "22222222")
    (tmp_path / "m" / MANIFEST).mkdir()  # the manifest cannot be replaced: its write fails
    (tmp_path / "m" / MANIFEST / "x").write_text("keeps the folder non-empty")
    with pytest.raises(OSError):
        publish_table(out, new, {})
    assert all((tmp_path / "m" / PARTS / p.file).is_file() for p in old)  # nothing removed before the manifest
    (tmp_path / "m" / MANIFEST / "x").unlink()
    (tmp_path / "m" / MANIFEST).rmdir()
    for part in new:
        write_atomic(out, f"{PARTS}/{part.file}", part_bytes(_part_rows(list(part.relpaths))))
    publish_table(out, new, {})
    assert sorted(p.name for p in (tmp_path / "m" / PARTS).iterdir()) == sorted(p.file for p in new)
    assert sorted(read_results(out)["relpath"]) == ["a.png", "b.png", "c.png"]


def test_keys_are_normalised_and_keys_that_climb_out_or_collide_are_refused():
    entries = listing_entries({"a//b.png": 1, "a/./c.png": 2, "a/c.png": 3, "../up.png": 4, "a/../../x.png": 5,
                               "/abs.png": 6, "d/e.png": 7})
    assert {rel: (e.key, e.refused is None) for rel, e in entries.items()} == {
        "a/b.png": ("a//b.png", True), "a/c.png": ("a/c.png", True), "a/./c.png": ("a/./c.png", False),
        "../up.png": ("../up.png", False), "a/../../x.png": ("a/../../x.png", False), "/abs.png": ("/abs.png", False),
        "d/e.png": ("d/e.png", True)}
    assert "leaves the input folder" in entries["../up.png"].refused
    assert "same path as 'a/c.png'" in entries["a/./c.png"].refused


def test_an_oversized_file_by_its_listed_size_is_an_error_row_without_being_read(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.png").write_bytes(png(np.zeros((64, 64, 3), "uint8")) + b"\0" * 5000)
    (tmp_path / "in" / "ok.png").write_bytes(b"small")
    src = open_location(str(tmp_path / "in"), bulk_settings().s3)
    sizes = list_image_sizes(src, [".png"])
    assert sizes["big.png"] > 5000
    batch = pd.DataFrame({"key": ["big.png", "ok.png", "gone.png"], "size": [sizes["big.png"], 5, 10**12],
                          "refused": [None, None, None]})
    got = read_batch(batch, src, max_bytes=4000)
    # gone.png does not exist: an error about its size proves it was never opened
    assert list(got["data"]) == [b"", b"small", b""]
    assert f"{sizes['big.png']} bytes is over the limit of 4000 bytes" in got["read_error"][0]
    assert pd.isna(got["read_error"][1]) and "1000000000000 bytes is over the limit" in got["read_error"][2]


class FlakyReads(pafs.FileSystemHandler):
    """A local folder whose first `fails` reads of each file raise OSError(`code`)."""

    def __init__(self, root: str, fails: int, code: int) -> None:
        self.local, self.root, self.fails, self.code, self.reads = pafs.LocalFileSystem(), root, fails, code, {}

    def open_input_stream(self, path):
        self.reads[path] = self.reads.get(path, 0) + 1
        if self.reads[path] <= self.fails:
            raise OSError(self.code, f"{errno.errorcode[self.code]} (injected)", path)
        return self.local.open_input_stream(path)

    def get_type_name(self): return "flaky"  # noqa: E704
    def normalize_path(self, path): return path  # noqa: E704
    def get_file_info(self, paths): return self.local.get_file_info(paths)  # noqa: E704
    def get_file_info_selector(self, selector): return self.local.get_file_info(selector)  # noqa: E704
    def open_input_file(self, path): return self.local.open_input_file(path)  # noqa: E704

    def _read_only(self, *args):
        raise NotImplementedError("read-only test filesystem")

    copy_file = create_dir = delete_dir = delete_dir_contents = delete_file = delete_root_dir_contents = _read_only
    move = open_append_stream = open_output_stream = _read_only


def _flaky(tmp_path, fails: int, code: int = errno.EIO) -> tuple[Location, FlakyReads]:
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "a.png").write_bytes(b"bytes of a")
    handler = FlakyReads(str(tmp_path / "in"), fails, code)
    return Location(pafs.PyFileSystem(handler), str(tmp_path / "in"), str(tmp_path / "in")), handler


def test_a_transient_local_read_error_is_retried_and_a_lasting_one_becomes_an_error_row(tmp_path):
    batch = pd.DataFrame({"key": ["a.png"], "size": [10], "refused": [None]})
    src, handler = _flaky(tmp_path, fails=2)
    got = read_batch(batch, src, max_bytes=1000)
    assert list(got["data"]) == [b"bytes of a"] and pd.isna(got["read_error"][0]) and max(handler.reads.values()) == 3
    src, handler = _flaky(tmp_path, fails=READ_ATTEMPTS)
    got = read_batch(batch, src, max_bytes=1000)
    assert f"after {READ_ATTEMPTS} attempts" in got["read_error"][0] and "EIO" in got["read_error"][0]
    src, handler = _flaky(tmp_path, fails=1, code=errno.EACCES)  # permanent: not retried
    got = read_batch(batch, src, max_bytes=1000)
    assert "EACCES" in got["read_error"][0] and max(handler.reads.values()) == 1


class BoomImage(ImageFile.ImageFile):
    """A Pillow format whose opener fails with an exception Pillow does not translate."""

    format = "BOOM"

    def _open(self) -> None:
        raise RuntimeError("decoder bug on this file")


@pytest.fixture
def boom_format():
    Image.register_open(BoomImage.format, BoomImage, lambda prefix: prefix[:4] == b"BOOM")
    try:
        yield
    finally:
        Image.OPEN.pop(BoomImage.format, None)
        Image.ID.remove(BoomImage.format)


def test_any_decoder_exception_is_that_image_s_error_row(trained_tiny, tmp_path, boom_format):
    _, result = trained_tiny
    settings = bulk_settings()
    src = open_location(str(tmp_path), settings.s3)
    ref = resolve_model(str(result.model_path.parent), None)
    scorer = BulkScorer(ref, "m", None, settings.bulk, src, None)
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 60)).save(good, format="PNG")
    batch = pd.DataFrame({"relpath": ["boom.png", "good.png"], "key": ["boom.png", "good.png"],
                          "data": [b"BOOM and then nothing", good.getvalue()], "read_error": [None, None], "part": [0, 0]})
    table = scorer(batch).to_pandas()
    assert table.loc[0, "error"] == f"cannot decode image {tmp_path / 'boom.png'}: RuntimeError: decoder bug on this file"
    assert pd.isna(table.loc[0, "probability"]) and pd.isna(table.loc[1, "error"])
    assert 0.0 <= table.loc[1, "probability"] <= 1.0
    assert json.loads(table.loc[1, "teacher"])


def test_a_damaged_lock_is_taken_over(output):
    out, s3 = output
    write_atomic(out, LOCK, b'{"run_id": "half')
    lock = acquire(out, s3, stale_s=300)
    assert read_holder(out) == lock.holder
    lock.release()
