"""DVC stage score: bulk-score `bulk.stage.input` with `bulk.stage.model` when `bulk.stage.enabled`.

Off by default: the stage then only writes a record saying so, so `dvc repro` stays fast and needs
no champion. The record (`--out`) is the run's summary when it ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from plantad.config import load_settings
from plantad.logs import quiet_library_logs, skip_driver_lines


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="JSON record of what the stage did")
    args = parser.parse_args(argv)
    settings = load_settings(args.params)
    stage = settings.bulk.stage
    if stage.enabled:
        from plantad.serving.bulk import run_bulk

        with skip_driver_lines():
            summary = run_bulk(settings, stage.input, stage.output, stage.model, stage.maps, progress=False)
        record = {"enabled": True, "input": stage.input, "model": stage.model, **summary.as_dict()}
        print(summary.text())
    else:
        record = {"enabled": False, "reason": "bulk.stage.enabled is false in params.yaml"}
        print("bulk scoring stage disabled (bulk.stage.enabled: false)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
