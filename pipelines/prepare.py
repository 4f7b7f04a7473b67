"""DVC stage prepare: scan the dataset folder into the manifest Parquet (undecodable files are
recorded, not skipped, so that the validate stage names them), and write the dataset as Parquet
shards under data.shards.location (local or s3://) for the Ray workers, which read nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from plantad.config import load_settings
from plantad.data.manifest import scan_dataset, write_manifest
from plantad.data.shards import write_shards
from plantad.logs import quiet_library_logs
from plantad.tracking.s3 import storage_env


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="dataset root (MVTec layout)")
    parser.add_argument("--out", required=True, help="manifest Parquet to write")
    parser.add_argument("--shards", required=True, help="JSON record of the shard set to write (where, which version)")
    args = parser.parse_args(argv)
    settings = load_settings(args.params)
    os.environ.update(storage_env(settings.s3))
    df = scan_dataset(Path(args.data), settings.data.categories, on_error="record", progress=True)
    cfg = settings.data.shards
    shards = write_shards(df, Path(args.data), cfg.location, settings.s3, cfg.max_bytes)
    write_manifest(df, Path(args.out))
    record = Path(args.shards)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(shards.as_dict(), indent=2))
    counts = df.groupby(["category", "split"]).size().to_dict()
    print(f"manifest of {len(df)} images written to {args.out}: {counts}")
    print(f"{len(shards.parts)} shard(s) of {shards.rows} rows in {shards.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
