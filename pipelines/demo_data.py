"""DVC stage demo_data: write the procedural demo dataset (nothing is downloaded)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plantad.config import load_settings
from plantad.data.demo import generate_demo
from plantad.logs import quiet_library_logs


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    settings = load_settings(args.params)
    generate_demo(Path(args.out), settings.demo)
    print(f"demo dataset written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
