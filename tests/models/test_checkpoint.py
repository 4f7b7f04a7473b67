"""Safe loading: model.pt is checked against the sha256 in model.json and read with
weights_only=True; tampered files and pickled code are refused, and the code never runs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from plantad.models.checkpoint import META_FILE, MODEL_FILE, SHA256_KEY, ModelLoadError, load_model, save_model
from plantad.models.safe_load import file_sha256
from plantad.models.factory import build_model

from tiny import tiny_settings


class RunsCode:
    """Unpickling this calls os.makedirs(marker): code run by loading, as in a malicious model.pt."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture
def saved(tmp_path):
    """A tiny untrained model with a stored threshold, saved by save_model; (settings, model dir)."""
    settings = tiny_settings()
    torch.manual_seed(0)
    model = build_model(settings)
    model.noisy_or.threshold.fill_(0.5)
    out = tmp_path / "model"
    save_model(model, settings, out)
    return settings, out


def rewrite_recorded_sha(model_dir):
    """What someone who can write both files does: record the hash of the file they put there."""
    meta = json.loads((model_dir / META_FILE).read_text())
    meta[SHA256_KEY] = file_sha256(model_dir / MODEL_FILE)
    (model_dir / META_FILE).write_text(json.dumps(meta))


def test_model_json_records_the_sha256_of_model_pt(saved):
    _, out = saved
    meta = json.loads((out / META_FILE).read_text())
    assert meta[SHA256_KEY] == file_sha256(out / MODEL_FILE)
    model, loaded_meta = load_model(out)
    assert float(model.noisy_or.threshold) == 0.5 and loaded_meta["format_version"] == meta["format_version"]
    assert load_model(out / MODEL_FILE)[0] is not None  # the file path works as before


def test_tampered_model_pt_is_refused(saved):
    settings, out = saved
    blob = torch.load(out / MODEL_FILE, weights_only=True)
    blob["state_dict"]["noisy_or.threshold"] = torch.tensor(0.0)  # flags every image, say
    torch.save(blob, out / MODEL_FILE)
    with pytest.raises(ModelLoadError, match=r"refusing to load .*model.pt: its sha256 is [0-9a-f]{64} but "
                                             r".*model.json \(model_sha256\) records"):
        load_model(out)


def test_pickled_code_is_never_executed(saved, tmp_path):
    _, out = saved
    marker = tmp_path / "code-ran"
    blob = torch.load(out / MODEL_FILE, weights_only=True)
    torch.save({**blob, "payload": RunsCode(marker)}, out / MODEL_FILE)
    with pytest.raises(ModelLoadError, match="its sha256 is"):  # the hash stops it first
        load_model(out)
    assert not marker.exists()
    rewrite_recorded_sha(out)  # the hash matches now: weights_only refuses the pickled call
    with pytest.raises(ModelLoadError, match=r"holds pickled objects that are not plain weights.*never executed"
                                             r".*GLOBAL os.makedirs"):
        load_model(out)
    assert not marker.exists()
    torch.load(out / MODEL_FILE, weights_only=False)  # control: the payload does run when trusted
    assert marker.exists()


def test_missing_hash_and_unreadable_files_are_clear_errors(saved):
    _, out = saved
    meta = json.loads((out / META_FILE).read_text())
    del meta[SHA256_KEY]
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"model.json records no 'model_sha256'.*re-save"):
        load_model(out)
    (out / META_FILE).unlink()
    with pytest.raises(ModelLoadError, match="records no 'model_sha256'"):
        load_model(out)
    (out / MODEL_FILE).write_bytes(b"garbage")
    (out / META_FILE).write_text(json.dumps({SHA256_KEY: file_sha256(out / MODEL_FILE)}))
    with pytest.raises(ModelLoadError, match="model.pt is not a readable weights file"):
        load_model(out)
