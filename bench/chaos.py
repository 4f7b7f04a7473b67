"""Fault injection with figures: SIGKILLed `dvc repro` stages, SIGKILLed Ray Train workers, a flaky S3,
a worker node lost under bulk scoring, online scoring and Ray Train, two bulk runs racing for one output.

    python bench/chaos.py --k 3                 # every fault K times (the README's table)
    python bench/chaos.py --k 1 --only s3       # one family
    python bench/chaos.py --k 3 --only dvc --stages score   # kills in one stage (after a full reference run)
    python bench/chaos.py --k 1 --only node --node-rows training --fixed --add-back 30

Everything runs on this machine with the test suite's real services: moto's S3 server, an MLflow
server proxying artifacts to it, a local Ray cluster of 2 CPUs, and DVC projects on the tiny
settings of tests/pipeline. Prints one Markdown table (fault, trials, recovered, data lost).
tests/pipeline/test_chaos.py runs the same functions with K=1.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests"), str(REPO / "tests" / "pipeline"),
                str(REPO / "tests" / "cluster"), str(REPO / "tests" / "serving")]

from chaos_common import Row, table  # noqa: E402
from chaos_node import NODE_ROWS  # noqa: E402

FAMILIES = ("dvc", "ray", "s3", "node", "race")


def run_families(families: list[str], work: Path, k: int, seed: int, s3, tracking_uri: str,
                 stage_env: dict[str, str], stages: list[str] | None = None, node: dict | None = None) -> list[Row]:
    """The chaos rows of the chosen families; services (S3, MLflow, Ray) must be up."""
    rng = random.Random(seed)
    rows: list[Row] = []
    if "dvc" in families:
        from chaos_dvc import dvc_kill_rows

        rows += dvc_kill_rows(work / "dvc", stage_env, tracking_uri, k, rng, stages)
    if "ray" in families:
        from chaos_ray import worker_kill_rows

        rows += worker_kill_rows(work / "ray", k, rng)
    if "s3" in families:
        from chaos_s3 import s3_fault_rows

        rows += s3_fault_rows(work / "s3", s3, tracking_uri, k, rng)
    if "node" in families:
        from chaos_node import node_loss_rows

        rows += node_loss_rows(work / "node", k, s3, tracking_uri, **(node or {}))
    if "race" in families:
        from chaos_race import race_rows

        rows += race_rows(work / "race", k, rng, s3)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=3, help="trials per fault")
    parser.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--stages", nargs="+", help="dvc family: kill only in these stages (default: every stage)")
    parser.add_argument("--node-rows", nargs="+", choices=NODE_ROWS, default=list(NODE_ROWS),
                        help="node family: which of its trials to run")
    parser.add_argument("--add-back", type=float, metavar="SECONDS",
                        help="node family, training: add a node of 1 CPU this long after the loss")
    parser.add_argument("--fixed", action="store_true",
                        help="node family, training: keep 2 workers (wait for capacity) instead of going on with 1")
    parser.add_argument("--work", type=Path, help="keep every trial's files and reports in this new folder "
                                                   "(default: a temporary folder, removed at the end)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from infra.fixtures import local_ray, mlflow_server_process, moto_server
    from pipeline_project import joined_stage_env

    from plantad.cluster import LOOPBACK_ENV

    os.environ.update(LOOPBACK_ENV)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    started = time.monotonic()
    with ExitStack() as stack:
        if args.work is not None:
            args.work.mkdir(parents=True)  # a new folder: a kept run is never mixed with an earlier one
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        (work / "home").mkdir()
        s3 = stack.enter_context(moto_server(work / "no-aws-files"))
        tracking_uri = stack.enter_context(mlflow_server_process(s3, work))
        stack.enter_context(local_ray())
        rows = run_families(args.only, work, args.k, args.seed, s3, tracking_uri, joined_stage_env(work / "home"),
                            args.stages, {"which": tuple(args.node_rows), "add_back": args.add_back, "fixed": args.fixed})
    print(f"\nK={args.k}, seed {args.seed}, {time.monotonic() - started:.0f} s\n")
    print(table(rows))
    return 0 if all(r.recovered == r.trials and r.data_lost == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
