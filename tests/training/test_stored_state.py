"""A restarted worker group resumes from the newest complete training state in the run's storage,
also one Ray never registered (a node lost while the ranks reported), locally and on S3."""

from __future__ import annotations

import io
import uuid

import pyarrow.fs
import pytest
import torch

from pydantic import ValidationError

from plantad.config import RayConfig, S3Config
from plantad.tracking.s3 import pyarrow_filesystem, s3_client
from plantad.training.ray_train import STATE_FILE, newest_stored_state, stored_states


def state_bytes(step: int) -> bytes:
    out = io.BytesIO()
    torch.save({"model": {"w": torch.full((2,), float(step))}, "step": step}, out)
    return out.getvalue()


def write(fs: pyarrow.fs.FileSystem, path: str, data: bytes) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def check_newest(fs: pyarrow.fs.FileSystem, run: str) -> None:
    assert newest_stored_state(fs, run) is None  # nothing written yet: no folder at all
    write(fs, f"{run}/checkpoint_2026-12-06_10-00-01.000000/{STATE_FILE}", state_bytes(5))
    write(fs, f"{run}/checkpoint_2026-12-06_10-00-09.000000/{STATE_FILE}", state_bytes(10))
    write(fs, f"{run}/checkpoint_2026-12-06_10-00-09.000000/notes.txt", b"not a state")
    assert newest_stored_state(fs, run)["step"] == 10
    # the newest copy was cut short (a node lost mid-copy): the one before it is the run's state
    write(fs, f"{run}/checkpoint_2026-12-06_10-00-17.000000/{STATE_FILE}", state_bytes(15)[:200])
    assert [p.rsplit("/", 2)[-2][-15:] for p in stored_states(fs, run)] == ["10-00-17.000000", "10-00-09.000000",
                                                                           "10-00-01.000000"]
    state = newest_stored_state(fs, run)
    assert state["step"] == 10 and torch.equal(state["model"]["w"], torch.full((2,), 10.0))


def test_the_newest_complete_state_in_a_local_run_folder(tmp_path) -> None:
    check_newest(pyarrow.fs.LocalFileSystem(), str(tmp_path / "runs" / "plantad-run"))


def test_the_newest_complete_state_in_an_s3_run_prefix(moto_s3: S3Config) -> None:
    bucket = f"states-{uuid.uuid4().hex[:8]}"
    s3_client(moto_s3).create_bucket(Bucket=bucket)
    check_newest(pyarrow_filesystem(moto_s3), f"{bucket}/ray/plantad-run")


@pytest.mark.parametrize("junk", [b"", b"PK\x03\x04 not a zip"])
def test_a_run_with_only_broken_states_starts_from_step_zero(tmp_path, junk: bytes) -> None:
    fs, run = pyarrow.fs.LocalFileSystem(), str(tmp_path / "run")
    write(fs, f"{run}/checkpoint_2026-12-06_10-00-01.000000/{STATE_FILE}", junk)
    assert newest_stored_state(fs, run) is None


def test_the_worker_count_is_fixed_unless_a_minimum_makes_it_elastic() -> None:
    assert RayConfig(num_workers=3).scaling_workers() == 3
    assert RayConfig(num_workers=3, min_workers=1).scaling_workers() == (1, 3)
    with pytest.raises(ValidationError, match=r"ray.min_workers \(4\) is above ray.num_workers \(3\)"):
        RayConfig(num_workers=3, min_workers=4)
