"""Bad data stops `dvc repro` at validate: the output names every broken expectation and file,
nothing trains, and the registry is left as it was. One run with five kinds of damage at once;
tests/validation/ checks each kind (and more) on its own, in process."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image
from pipeline_project import DATA, Project, registry_state, run_ids

# Each case corrupts the dataset (the baseline's, which validates) and returns the expectations
# that must fail (names from plantad/validation/rules.py) and the dataset paths the output must name.
Corruption = Callable[[Path], tuple[set[str], list[str]]]


def missing_mask(data: Path) -> tuple[set[str], list[str]]:
    (data / "nut" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    return {"anomalous test images have masks"}, ["nut/test/scratch/000.png"]


def train_image_in_test(data: Path) -> tuple[set[str], list[str]]:
    shutil.copyfile(data / "weave" / "train" / "good" / "004.png", data / "weave" / "test" / "good" / "900.png")
    return {"no image in both train and test"}, ["weave/test/good/900.png", "weave/train/good/004.png"]


def undecodable_file(data: Path) -> tuple[set[str], list[str]]:
    (data / "metal" / "test" / "good" / "900.png").write_bytes(b"these bytes are not a PNG\n" * 40)
    return {"every image decodes"}, ["metal/test/good/900.png"]


def mask_of_wrong_size(data: Path) -> tuple[set[str], list[str]]:
    mask = data / "metal" / "ground_truth" / "spot" / "000_mask.png"
    with Image.open(mask) as im:
        im.resize((im.width // 2, im.height // 2)).save(mask)
    return {"mask width matches image width", "mask height matches image height"}, [
        "metal/test/spot/000.png", "metal/ground_truth/spot/000_mask.png"]


def image_too_small(data: Path) -> tuple[set[str], list[str]]:
    Image.new("RGB", (16, 20), (90, 120, 60)).save(data / "nut" / "train" / "good" / "900.png")
    return {"image width within bounds", "image height within bounds"}, ["nut/train/good/900.png"]


CORRUPTIONS: list[Corruption] = [missing_mask, train_image_in_test, undecodable_file, mask_of_wrong_size,
                                 image_too_small]


@pytest.mark.e2e
def test_bad_data_stops_the_pipeline_at_validate_naming_every_problem(
    project: Project, mlflow_server: str, registry_names: dict[str, str]
) -> None:
    client = MlflowClient(mlflow_server)
    registry_before = registry_state(client, registry_names["registered_model"])
    runs_before = run_ids(client, registry_names["experiment"])
    lock_before = project.lock()
    model_json = (project.root / "outputs" / "model" / "model.json").read_bytes()
    assert project.status() == {}  # the copy starts green

    failing: set[str] = set()
    paths: list[str] = []
    for corrupt in CORRUPTIONS:
        names, named_paths = corrupt(project.root / DATA)
        failing |= names
        paths += named_paths
    repro = project.repro(timeout=180, check=False)

    out = repro.output
    assert repro.proc.returncode != 0, repro.tail()
    assert repro.ran == ["prepare", "validate"], repro.tail()
    assert "failed to reproduce 'validate'" in out, repro.tail()
    for name in failing:
        assert f"- {name} [" in out, f"expectation '{name}' not named\n{repro.tail()}"
    for path in paths:
        assert path in out, f"path {path} not named\n{repro.tail()}"
    report = json.loads((project.root / "outputs" / "validation" / "validation.json").read_text())["report"]
    assert report["success"] is False
    assert {f["expectation"] for f in report["failures"]} == failing

    lock = project.lock()
    for stage in ("train", "evaluate", "register"):
        assert lock[stage] == lock_before[stage], stage
    assert (project.root / "outputs" / "model" / "model.json").read_bytes() == model_json
    assert run_ids(client, registry_names["experiment"]) == runs_before  # train never started a run
    assert registry_state(client, registry_names["registered_model"]) == registry_before
