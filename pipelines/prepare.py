"""DVC stage prepare: scan the dataset folder into the manifest Parquet (undecodable files are
recorded, not skipped, so that the validate stage names them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plantad.config import load_settings
from plantad.data.manifest import scan_dataset, write_manifest
from plantad.logs import quiet_library_logs


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="dataset root (MVTec layout)")
    parser.add_argument("--out", required=True, help="manifest Parquet to write")
    args = parser.parse_args(argv)
    settings = load_settings(args.params)
    df = scan_dataset(Path(args.data), settings.data.categories, on_error="record", progress=True)
    write_manifest(df, Path(args.out))
    counts = df.groupby(["category", "split"]).size().to_dict()
    print(f"manifest of {len(df)} images written to {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
