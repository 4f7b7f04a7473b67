"""DVC stage `validate`: run the GX suite over the manifest; a non-zero exit stops `dvc repro`.

    python pipelines/validate.py --manifest outputs/manifest.parquet --out outputs/validation

Exit codes: 0 valid, 1 the data broke an expectation (summary on stderr), 2 bad params or no manifest.
validation.json and data_docs/ are written under --out whether or not validation passes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from plantad.config import ConfigError, load_settings
from plantad.logs import quiet_library_logs
from plantad.validation import validate_manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="manifest Parquet (prepare stage)")
    parser.add_argument("--out", type=Path, required=True, help="folder for validation.json and data_docs/")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (validation.*)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    args = parse_args(argv)
    # the handler filters, not the root logger: GX sets some of its loggers to INFO on import
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        cfg = load_settings(args.params).validation
    except ConfigError as exc:
        print(f"validate: {exc}", file=sys.stderr)
        return 2
    if not args.manifest.is_file():
        print(f"validate: manifest {args.manifest} not found; run the prepare stage first", file=sys.stderr)
        return 2
    report = validate_manifest(pd.read_parquet(args.manifest), cfg, args.out)
    if report.success:
        print(report.summary())
        return 0
    print(report.summary(), file=sys.stderr)
    docs = args.out / "data_docs" / "index.html"
    print(f"details: {args.out / 'validation.json'} and {docs}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
