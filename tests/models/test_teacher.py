import logging
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from plantad.config import TeacherConfig
from plantad.models.safe_load import file_sha256
from plantad.models.teacher import RANDOM_WEIGHTS_WARNING, Teacher, TeacherLoadError

KW = {"depth": 4, "embed_dim": 64, "num_heads": 2}


def record_sha256(path):
    """What a user does after checking a downloaded checkpoint: `sha256sum f > f.sha256`."""
    path.with_name(path.name + ".sha256").write_text(f"{file_sha256(path)}  {path.name}\n")
    return path


def tiny_cfg(weights: str, **kw) -> TeacherConfig:
    return TeacherConfig(weights=weights, layers=[0, 1, 2, 3], groups=[[0, 1], [2, 3]], timm_kwargs={**KW, **kw})


@pytest.fixture
def source_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0, **KW).eval()


def test_safetensors_checkpoint_reproduces_the_source_model(tmp_path, source_vit):
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in source_vit.state_dict().items()}, str(path))
    teacher = Teacher(tiny_cfg(str(record_sha256(path))), image_size=56)
    x = torch.randn(2, 3, 56, 56)
    feats = teacher(x)
    expected = source_vit.forward_features(x)
    assert torch.allclose(feats.cls, expected[:, 0], atol=1e-5)
    assert [f.shape for f in feats.layers] == [(2, 16, 64)] * 4
    assert feats.prefix[0].shape == (2, 1, 64)
    assert teacher.identity.source == "checkpoint"
    assert teacher.identity.sha256 == file_sha256(path)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_meta_pth_layout_is_converted_and_pos_embed_resampled(tmp_path, source_vit):
    """Meta's original checkpoints carry mask_token and a pos_embed for another size."""
    state = dict(source_vit.state_dict())
    state["mask_token"] = torch.zeros(1, 64)
    path = tmp_path / "dinov2_meta.pth"
    torch.save(state, path)
    teacher = Teacher(tiny_cfg(str(record_sha256(path))), image_size=70)  # 5x5 patches instead of 4x4
    assert teacher.vit.pos_embed.shape == (1, 26, 64)
    assert torch.equal(teacher.vit.blocks[2].attn.qkv.weight, source_vit.blocks[2].attn.qkv.weight)
    assert teacher.grid == (5, 5)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(TeacherLoadError, match="nowhere.safetensors.*does not exist"):
        Teacher(tiny_cfg(str(tmp_path / "nowhere.safetensors")), image_size=56)


def test_mismatched_checkpoint_names_file_and_keys(tmp_path):
    other = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0, depth=4, embed_dim=32, num_heads=2)
    path = tmp_path / "wrong_width.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    record_sha256(path)
    with pytest.raises(TeacherLoadError) as err:
        Teacher(tiny_cfg(str(path)), image_size=56)
    msg = str(err.value)
    assert "wrong_width.safetensors" in msg and "pos_embed" in msg and "size mismatch" in msg


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherLoadError, match="garbage.pth"):
        Teacher(tiny_cfg(str(record_sha256(path))), image_size=56)


def test_checkpoint_without_recorded_sha256_is_refused(tmp_path, source_vit):
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in source_vit.state_dict().items()}, str(path))
    with pytest.raises(TeacherLoadError, match=r"teacher.safetensors has no recorded sha256.*sha256sum"):
        Teacher(tiny_cfg(str(path)), image_size=56)


def test_tampered_checkpoint_is_refused(tmp_path, source_vit):
    path = tmp_path / "teacher.pth"
    torch.save(dict(source_vit.state_dict()), path)
    record_sha256(path)
    state = dict(source_vit.state_dict())
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"] + 1.0  # a swapped file
    torch.save(state, path)
    with pytest.raises(TeacherLoadError, match=r"refusing to load .*teacher.pth: its sha256 is .* records"):
        Teacher(tiny_cfg(str(path)), image_size=56)


class RunsCode:
    """Unpickling this calls os.makedirs(marker): code run by loading, as in a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.makedirs, (self.marker,))


def test_pickled_code_in_a_checkpoint_is_never_executed(tmp_path, source_vit):
    """Even with a matching recorded hash (an attacker rewrote both), weights_only refuses the code."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({**source_vit.state_dict(), "payload": RunsCode(marker)}, path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "control")))  # the payload does run when unpickled
    assert (tmp_path / "control").exists()
    with pytest.raises(TeacherLoadError, match=r"refusing to load .*evil.pth: it holds pickled objects"):
        Teacher(tiny_cfg(str(record_sha256(path))), image_size=56)
    assert not marker.exists()


def test_random_weights_only_when_asked_and_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        teacher = Teacher(tiny_cfg("random"), image_size=56)
    assert RANDOM_WEIGHTS_WARNING in caplog.text
    assert teacher.identity.as_dict()["warning"] == RANDOM_WEIGHTS_WARNING


def test_layers_outside_the_model_are_rejected():
    cfg = TeacherConfig(weights="random", layers=[0, 7], groups=[[0], [1]], timm_kwargs=KW)
    with pytest.raises(ValueError, match=r"layers \[7\] outside the teacher's 4 blocks"):
        Teacher(cfg, image_size=56)
