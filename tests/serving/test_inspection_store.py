"""The line's store without a cluster: bands folded from an append-only log that two replicas write at
once, refused bad bands, part records in Parquet with drops counted, and the review export into an
MVTec-layout dataset (skipping images it already holds); records, images and verdicts on an S3
prefix (moto's server) written by two replicas at once."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from plantad.config import RecordsConfig, S3Config
from plantad.serving.bands import Band, BandBook, check_line, key_id, parse_band, resolve
from plantad.serving.inputs import ApiError
from plantad.serving.records import PartRecorder, Pending, image_path, pixel_sha256, read_records
from plantad.data.manifest import scan_dataset
from plantad.serving.review import (ExportError, export_reviewed, parse_verdict, read_verdicts, review_queue,
                                    reviewed_images, save_verdict)
from plantad.storage import Location, open_location, read_bytes


def store(tmp_path) -> Location:
    return open_location(str(tmp_path / "store"), S3Config())


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8))


def test_two_replicas_writing_bands_at_once_lose_no_change_and_agree(tmp_path):
    loc = store(tmp_path)
    a, b = BandBook(loc, poll_s=3600), BandBook(loc, poll_s=3600)
    assert a.band("press-1", 0.4) == (Band(0.4, 0.4), "calibrated")  # no saved band: today's threshold
    writers = [threading.Thread(target=book.save, args=(f"press-{i}", {"low": 0.1 * i, "high": 0.5}, f"key-{i}",
                                                        "3", 0.4)) for i, book in enumerate([a, b, a, b], start=1)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    a.save("press-1", {"low": 0.2, "high": 0.9}, "key-9", "3", 0.4)
    b.refresh()
    assert a.bands == b.bands and len(a.events) == len(b.events) == 5
    assert b.band("press-1", 0.4) == (Band(0.2, 0.9), "line")
    last = b.audit("press-1")[0]
    assert (last["old"], last["new"], last["who"], last["model_version"]) == (
        {"low": 0.1, "high": 0.5}, {"low": 0.2, "high": 0.9}, "key-9", "3")
    assert b.band("press-7", 0.4)[1] == "calibrated"
    b.save("default", {"low": 0.3, "high": 0.6}, "key-9", "3", 0.4)
    a.save("press-1", None, "key-9", "3", 0.4)  # reset: the line falls back to the default
    assert a.band("press-1", 0.4) == (Band(0.3, 0.6), "default")
    assert Band(0.3, 0.6).decide(0.29) == "OK" and Band(0.3, 0.6).decide(0.3) == "REVIEW"
    assert Band(0.3, 0.6).decide(0.6) == "NG" and Band(0.5, 0.5).decide(0.5) == "NG"


@pytest.mark.parametrize("doc, message", [
    ({"low": 0.7, "high": 0.2}, "low 0.7 is above high 0.2"), ({"low": -0.1, "high": 0.2}, "not a probability"),
    ({"low": 0.1, "high": 1.5}, "not a probability"), ({"low": "a", "high": 0.2}, "not a probability"),
    ({"low": 0.1}, "a band is"), ({"low": float("nan"), "high": 0.2}, "not a probability")])
def test_bad_bands_are_refused_with_a_message(doc, message):
    with pytest.raises(ApiError, match=message) as err:
        parse_band(doc)
    assert err.value.status == 400


def test_unknown_lines_and_saving_without_a_store_are_refused():
    with pytest.raises(ApiError, match="unknown line 'press-9'") as err:
        check_line("press-9", {"press-1": "weave"})
    assert err.value.status == 404
    assert check_line("default", {"press-1": "weave"}) == "default"
    with pytest.raises(ApiError, match="serve.store is not set"):
        BandBook(None, 1.0).save("press-1", {"low": 0.1, "high": 0.2}, "open", "1", 0.5)
    assert key_id("Bearer abc", frozenset({"abc"})).startswith("key-") and "abc" not in key_id("Bearer abc",
                                                                                             frozenset({"abc"}))


def test_records_are_parquet_parts_with_images_of_doubtful_parts_and_counted_drops(tmp_path):
    loc = store(tmp_path)
    dropped: list[int] = []
    cfg = RecordsConfig(enabled=True, flush_s=3600, part_rows=10, buffer_rows=3)
    rec = PartRecorder(loc, cfg, on_drop=dropped.append)
    rows = []
    for i, decision in enumerate(["OK", "REVIEW", "NG", "NG"]):
        img = image(i)
        keep = rec.wants_image(decision)
        rows.append(Pending({"time": float(i), "line": "press-1", "part_id": f"p{i}", "sha256": pixel_sha256(img),
                             "decision": decision, "probability": 0.1 * i, "image_stored": keep},
                            img if keep else None))
    assert rec.add(rows) == 1 and dropped == [1]  # the fourth row did not fit the buffer: counted, never waited for
    assert rec.flush() == 3
    rec.stop()
    got = read_records(loc)
    assert [r["part_id"] for r in got] == ["p0", "p1", "p2"]
    assert [r["image_stored"] for r in got] == [False, True, True]
    queue = review_queue(got, [], None, 10)
    assert [r["part_id"] for r in queue] == ["p2", "p1"]  # newest first, OK images not kept (share 0)
    save_verdict(loc, got[1]["sha256"], "normal", None, "key-1")
    assert [r["part_id"] for r in review_queue(got, read_verdicts(loc), None, 10)] == ["p2"]
    with pytest.raises(ApiError, match="no stored image"):
        save_verdict(loc, got[0]["sha256"], "normal", None, "key-1")
    with pytest.raises(ApiError, match="needs a defect name"):
        parse_verdict({"sha256": got[2]["sha256"], "verdict": "defective"})


def test_parts_without_the_drift_column_read_beside_new_ones(tmp_path):
    """A part an older plantad wrote (no `drift` column) and a new one: both read, the old rows with
    drift None, and the review queue lists both."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from plantad.serving.records import SCHEMA

    loc = store(tmp_path)
    old_schema = pa.schema([f for f in SCHEMA if f.name != "drift"])
    (tmp_path / "store" / "records" / "2026-01-01").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"time": 1.0, "line": "press-1", "sha256": "a" * 64, "decision": "NG",
                                          "image_stored": True}], schema=old_schema),
                   tmp_path / "store" / "records" / "2026-01-01" / "old.parquet")
    rec = PartRecorder(loc, RecordsConfig(enabled=True, flush_s=3600, images=False))
    rec.add([Pending({"time": 2.0, "line": "press-1", "sha256": "b" * 64, "decision": "NG", "image_stored": True,
                      "drift": [0.5, -1.25]}, None)])
    rec.flush()
    rec.stop()
    got = read_records(loc)
    assert [(r["sha256"][0], r["drift"]) for r in got] == [("a", None), ("b", [0.5, -1.25])]
    assert [r["sha256"][0] for r in review_queue(got, [], "press-1", 10)] == ["b", "a"]


def test_export_writes_reviewed_images_into_the_dataset_once(tmp_path):
    loc, data = store(tmp_path), tmp_path / "data"
    (data / "weave" / "train" / "good").mkdir(parents=True)
    image(0).save(data / "weave" / "train" / "good" / "000.png")  # already in the dataset
    rec = PartRecorder(loc, RecordsConfig(enabled=True, flush_s=3600), on_drop=None)
    shas = [pixel_sha256(image(i)) for i in range(3)]
    rec.add([Pending({"time": float(i), "line": "press-1", "sha256": shas[i], "decision": "REVIEW",
                      "probability": 0.5, "image_stored": True}, image(i)) for i in range(3)])
    rec.flush()
    rec.stop()
    for sha, verdict, defect in [(shas[0], "normal", None), (shas[1], "normal", None), (shas[2], "defective", "hole")]:
        save_verdict(loc, sha, verdict, defect, "key-1")
    with pytest.raises(ExportError, match="line 'press-1', which has no category"):
        export_reviewed(loc, data, {})
    with pytest.raises(ExportError, match="is not a dataset"):
        export_reviewed(loc, tmp_path / "store", {"press-1": "weave"})
    result = export_reviewed(loc, data, {"press-1": "weave"})
    assert result.skipped_present == 1
    assert sorted(result.written) == sorted([f"weave/train/good/review-{shas[1][:16]}.png",
                                             f"weave/test/hole/review-{shas[2][:16]}.png"])
    assert pixel_sha256(Image.open(data / result.written[0])) in shas
    again = export_reviewed(loc, data, {"press-1": "weave"})
    assert again.written == [] and again.skipped_present == 3
    assert reviewed_images(scan_dataset(data)) == 2  # the registered version's `reviewed_images` tag


def test_bands_as_false_reject_rates_are_re_derived_for_each_version():
    rng = np.random.default_rng(0)
    versions = {"3": rng.beta(2, 8, 400), "4": rng.beta(2, 5, 250)}  # held-out normal probabilities of two versions
    spec = parse_band({"low_frr": 0.05, "high_frr": 0.01})
    for normal in versions.values():
        band = resolve(spec, normal)
        for threshold, rate in ((band.low, 0.05), (band.high, 0.01)):
            rejected = float(np.mean(normal >= threshold))
            assert rate - 1 / len(normal) < rejected <= rate  # the stated rate, as closely as n images allow
    assert resolve(spec, versions["3"]) != resolve(spec, versions["4"])
    assert resolve(spec, None) is None  # a version without stored quantiles: the calibrated threshold
    with pytest.raises(ApiError, match="high_frr 0.1 is above low_frr 0.05"):
        parse_band({"low_frr": 0.05, "high_frr": 0.1})


def test_records_and_reviews_on_an_s3_prefix_with_two_writers_racing_lose_nothing(moto_s3, tmp_path):
    loc = open_location(f"s3://{moto_s3.bucket}/line-window", moto_s3)  # moto's S3 server on 127.0.0.1
    recorders = [PartRecorder(loc, RecordsConfig(enabled=True, flush_s=3600, part_rows=3), on_drop=None)
                 for _ in range(2)]
    shared = image(999)  # both replicas store the same image: one content-addressed object, raced on
    start = threading.Barrier(2)

    def record(w: int) -> None:
        start.wait()
        for batch in range(2):
            rows = [Pending({"time": float(100 * w + 10 * batch + k), "line": "press-1", "part_id": f"w{w}-{batch}-{k}",
                             "sha256": pixel_sha256(image(100 * w + 10 * batch + k)), "decision": "REVIEW",
                             "probability": 0.5, "image_stored": True}, image(100 * w + 10 * batch + k))
                    for k in range(4)]
            rows.append(Pending({"time": 1000.0 + w, "line": "press-1", "part_id": f"w{w}-shared",
                                 "sha256": pixel_sha256(shared), "decision": "NG", "probability": 0.9,
                                 "image_stored": True}, shared))
            assert recorders[w].add(rows) == 0  # written by the replica's thread (part_rows 3: two parts)

    threads = [threading.Thread(target=record, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rec in recorders:
        rec.stop()  # a graceful stop writes what is pending
    got = read_records(loc)
    assert len(got) == 20 and len({r["part_id"] for r in got}) == 18  # every row; the shared part twice per writer
    for sha in {r["sha256"] for r in got}:
        assert pixel_sha256(Image.open(io.BytesIO(read_bytes(loc, image_path(sha))))) == sha
    own = sorted({r["sha256"] for r in got} - {pixel_sha256(shared)})
    halves = [own[::2], own[1::2]]

    def review(w: int) -> None:  # two replicas taking verdicts at once
        start.wait()
        for sha in halves[w]:
            save_verdict(loc, sha, "normal" if w == 0 else "defective", None if w == 0 else "hole", f"key-{w}")

    threads = [threading.Thread(target=review, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    verdicts = read_verdicts(loc)
    assert sorted(v["sha256"] for v in verdicts) == own
    assert [i["sha256"] for i in review_queue(got, verdicts, None, 100)] == [pixel_sha256(shared)]
    data = tmp_path / "data"
    (data / "weave" / "train" / "good").mkdir(parents=True)
    result = export_reviewed(loc, data, {"press-1": "weave"})
    assert len(result.written) == 16 and sum("/test/hole/" in p for p in result.written) == len(halves[1])
