"""Parquet shards of the dataset: written once per manifest fingerprint, read back byte for byte
from a local folder or moto's S3, and refused for another data version or after tampering."""

from __future__ import annotations

import json
import shutil
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plantad.config import S3Config
from plantad.data.manifest import manifest_fingerprint, scan_dataset
from plantad.data.shards import (
    INDEX,
    ShardError,
    open_shards,
    read_shard_images,
    require_match,
    shard_location,
    write_shards,
)
from plantad.tracking.s3 import s3_client

LOCAL = S3Config()


@pytest.fixture
def manifest(demo_root):
    return scan_dataset(demo_root)


def test_shards_hold_every_row_and_its_bytes_in_parts_of_the_configured_size(manifest, demo_root, tmp_path):
    max_bytes = 40_000
    shards = write_shards(manifest, demo_root, str(tmp_path / "shards"), LOCAL, max_bytes)
    assert shards.fingerprint == manifest_fingerprint(manifest) and shards.rows == len(manifest)
    assert len(shards.parts) > 2  # the small size splits this dataset
    rows = []
    for part in shards.parts:
        table = pq.read_table(f"{shards.folder}/{part.name}")
        payload = sum(len(b or b"") for c in ("image", "mask") for b in table.column(c).to_pylist())
        assert table.num_rows == part.rows and (payload <= max_bytes or part.rows == 1)
        rows += table.to_pylist()
    assert [r["path"] for r in rows] == list(manifest["path"])  # manifest order, nothing dropped
    for row in rows:
        assert row["image"] == (demo_root / row["path"]).read_bytes()
        mask = row["mask_path"]
        assert row["mask"] == (None if mask is None else (demo_root / mask).read_bytes())
    assert open_shards(str(tmp_path / "shards"), manifest, LOCAL) == shards


def test_the_same_data_version_is_not_written_twice(manifest, demo_root, tmp_path):
    first = write_shards(manifest, demo_root, str(tmp_path / "s"), LOCAL, 40_000)
    stamps = {p.name: (tmp_path / "s" / first.fingerprint / p.name).stat().st_mtime_ns for p in first.parts}
    again = write_shards(manifest, demo_root, str(tmp_path / "s"), LOCAL, 40_000)
    assert again == first
    assert stamps == {p.name: (tmp_path / "s" / first.fingerprint / p.name).stat().st_mtime_ns for p in first.parts}


def test_shards_of_another_manifest_are_refused_naming_both_fingerprints(manifest, demo_root, tmp_path):
    shards = write_shards(manifest, demo_root, str(tmp_path / "s"), LOCAL, 1_000_000)
    other = manifest.iloc[1:]  # one image less: another data version
    theirs, ours = shards.fingerprint, manifest_fingerprint(other)
    with pytest.raises(ShardError, match=rf"holds manifest fingerprint {theirs}, but the manifest's fingerprint "
                                         rf"is {ours}.*Re-run the prepare stage"):
        require_match(shards, other, shards.folder)
    with pytest.raises(ShardError, match=rf"no shard set for manifest fingerprint {ours}"):
        open_shards(str(tmp_path / "s"), other, LOCAL)
    # a set copied under another version's folder: its index still names the data it holds
    shutil.copytree(tmp_path / "s" / theirs, tmp_path / "s" / ours)
    mismatch = rf"holds manifest fingerprint {theirs}, but the manifest's fingerprint is {ours}"
    with pytest.raises(ShardError, match=mismatch):
        open_shards(str(tmp_path / "s"), other, LOCAL)


def test_an_image_changed_after_the_scan_stops_the_write_and_commits_nothing(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    manifest = scan_dataset(data)
    changed = data / manifest["path"].iloc[3]
    changed.write_bytes((demo_root / manifest["path"].iloc[4]).read_bytes())
    with pytest.raises(ShardError, match=rf"{changed} changed since the manifest was written"):
        write_shards(manifest, data, str(tmp_path / "s"), LOCAL, 40_000)
    assert not (tmp_path / "s" / manifest_fingerprint(manifest) / INDEX).exists()
    with pytest.raises(ShardError, match="no shard set"):
        open_shards(str(tmp_path / "s"), manifest, LOCAL)


def test_a_damaged_shard_is_refused_before_and_where_it_is_read(manifest, demo_root, tmp_path):
    shards = write_shards(manifest, demo_root, str(tmp_path / "s"), LOCAL, 1_000_000)
    part = tmp_path / "s" / shards.fingerprint / shards.parts[0].name
    table = pq.read_table(part)
    images = table.column("image").to_pylist()
    images[0] = images[0][:-1] + bytes([images[0][-1] ^ 1])  # one flipped bit in the first image
    column = table.schema.get_field_index("image")
    pq.write_table(table.set_column(column, "image", pa.array(images, type=pa.binary())), part)
    first = table.column("path")[0].as_py()
    with pytest.raises(ShardError, match=rf"image {first} in shard set .* has sha256 \w+, the manifest records"):
        read_shard_images(shards, LOCAL, [first])
    part.write_bytes(part.read_bytes()[:1000])  # a truncated upload or copy
    with pytest.raises(ShardError, match=rf"{part.name} is 1000 bytes, its index records {shards.parts[0].bytes}"):
        open_shards(str(tmp_path / "s"), manifest, LOCAL)
    index = tmp_path / "s" / shards.fingerprint / INDEX
    index.write_text(json.dumps({**json.loads(index.read_text()), "parts": "?"}))
    with pytest.raises(ShardError, match="is not a shard index written by the prepare stage"):
        open_shards(str(tmp_path / "s"), manifest, LOCAL)


def test_shards_on_s3_are_read_back_through_the_endpoint(manifest, demo_root, moto_s3):
    location = f"s3://{moto_s3.bucket}/shards-{uuid.uuid4().hex[:8]}"
    shards = write_shards(manifest, demo_root, location, moto_s3, 60_000)
    keys = s3_client(moto_s3).list_objects_v2(Bucket=moto_s3.bucket, Prefix=location.split("/", 3)[3])["Contents"]
    assert sorted(k["Key"].rsplit("/", 1)[1] for k in keys) == sorted([INDEX, *(p.name for p in shards.parts)])
    assert open_shards(location, manifest, moto_s3) == shards
    assert shard_location(shards, moto_s3).uri == f"{location}/{shards.fingerprint}"
    wanted = list(manifest["path"].iloc[::7])
    got = read_shard_images(shards, moto_s3, wanted)
    assert got == {p: (demo_root / p).read_bytes() for p in wanted}
    with pytest.raises(ShardError, match=r"lacks 1 image\(s\) of the manifest: \['nowhere.png'\]"):
        read_shard_images(shards, moto_s3, [wanted[0], "nowhere.png"])
