"""bench/chaos.py, small (K=1, tiny settings), on the session's real services; nothing may be lost.

The full bench (`python bench/chaos.py --k 3`: every stage of a run from scratch, both Ray Train
kills, four S3 clients) gives the README's table. Here, to stay near two minutes:
- `dvc repro` is SIGKILLed once in `register` of a copy of the baseline project whose `mlflow`
  params changed, at a random point within the baseline's `register` duration;
- both Ray Train workers of a 15-step run are SIGKILLed the moment a checkpoint folder appears;
- bulk scoring runs from and to S3 through a proxy that drops and delays requests.
"""

from __future__ import annotations

import random
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from chaos_common import Row, table  # noqa: E402
from chaos_dvc import kill_rows  # noqa: E402
from chaos_ray import kill_mid_checkpoint, one_trial  # noqa: E402
from chaos_s3 import fault_row, scoring  # noqa: E402


def assert_all_recovered(rows: list[Row]) -> None:
    print(table(rows))
    assert rows and all(r.trials for r in rows), table(rows)
    failed = [r for r in rows if r.recovered != r.trials or r.data_lost]
    assert not failed, table(failed)


@pytest.mark.e2e
def test_a_killed_register_stage_recovers_and_leaves_every_version_loadable(project, baseline, mlflow_server,
                                                                           tmp_path) -> None:
    # re-runs register (and score) only; its own registered model, so that the session's shared one
    # (whose versions and aliases the retraining tests check) is left as the baseline made it
    project.set_params({"mlflow": {"promotion_metric": "image_ap", "registered_model": f"chaos-{uuid.uuid4().hex[:8]}"}})
    rows = kill_rows(project, baseline, ["register"], 1, random.Random(0), mlflow_server, tmp_path)
    assert_all_recovered(rows)


@pytest.mark.e2e
def test_workers_killed_while_a_checkpoint_is_written_resume_from_a_complete_one(
        ray_local, demo_root, demo_manifest, tmp_path) -> None:
    ok, lost, note = one_trial(tmp_path, demo_manifest, demo_root, kill_mid_checkpoint, random.Random(0), steps=15)
    assert_all_recovered([Row("SIGKILL both workers as a checkpoint is written", 1, int(ok), int(lost), note)])


@pytest.mark.e2e
def test_bulk_scoring_through_a_flaky_s3_endpoint_completes_with_every_row_right(
        ray_local, moto_s3, trained_tiny, demo_root, demo_manifest, tmp_path) -> None:
    _, result = trained_tiny
    relpaths = sorted(demo_manifest["path"])[:24]
    row = fault_row("bulk scoring S3 to S3",
                    lambda w, p: scoring(w, moto_s3, p, result.model_path.parent, demo_root, relpaths),
                    tmp_path, moto_s3, 1, random.Random(0))
    assert_all_recovered([row])
