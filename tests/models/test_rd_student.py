"""SNL's RD student is RD4AD's: a one-class bottleneck embedding and a decoder that mirrors the
teacher stage by stage; SNL's students train with RD4AD's optimiser, the dual models with Dinomaly's."""

import pytest
import timm
import torch
from torch import nn

from plantad.config import ConfigError
from plantad.models.cnn import CNNTeacher, ResNetRDStudent
from plantad.models.factory import build_model
from plantad.training.loop import build_optimizer, train_step
from tiny import tiny_method_settings

# tiny teachers of both block types, with unequal stage depths so that a mirror differs from a copy
TEACHERS = {
    "basic": ("resnet18", "{layers: [1, 2, 3, 2], channels: [8, 16, 32, 64], stem_width: 8}"),
    "wide_bottleneck": ("wide_resnet50_2", "{layers: [1, 2, 3, 2], channels: [4, 8, 16, 32], stem_width: 8}"),
}


def _settings(kind: str, *extra: str):
    name, kwargs = TEACHERS[kind]
    return tiny_method_settings("snl_rd", f"model.snl.cnn_teacher.name={name}",
                                f"model.snl.cnn_teacher.timm_kwargs={kwargs}", *extra)


@pytest.mark.parametrize("kind", TEACHERS)
def test_the_decoder_mirrors_the_teachers_stages_and_reaches_its_maps(kind):
    cfg = _settings(kind).model.snl
    net = timm.create_model(cfg.cnn_teacher.name, pretrained=False, **cfg.cnn_teacher.timm_kwargs)
    student = ResNetRDStudent(cfg.cnn_teacher, cfg)
    compared = [getattr(net, f"layer{i}") for i in cfg.cnn_teacher.stages]
    assert len(student.decoder) == len(compared) == 3
    for stage, mirrored in zip(student.decoder, compared[::-1]):  # deepest first
        blocks = list(stage.blocks)
        assert len(blocks) == len(mirrored)  # 3, 2, 1 blocks: the teacher's 1, 2, 3 reversed
        assert all(type(b) is type(mirrored[0]) for b in blocks)
        # the upsampling block: 2x2 stride-2 transposed convolutions on the main path and the shortcut
        ups = [m for m in blocks[0].modules() if isinstance(m, nn.ConvTranspose2d)]
        assert len(ups) == 2 and all(m.kernel_size == (2, 2) and m.stride == (2, 2) for m in ups)
        assert isinstance(blocks[0].downsample[0], nn.ConvTranspose2d)
        # the other blocks have exactly the teacher's blocks' shapes
        for ours, theirs in zip(blocks[1:], list(mirrored)[1:]):
            assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    assert not [m for m in student.decoder.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    # the one-class embedding: the teacher's next stage (its block type and count), the first block strided
    assert [type(b) for b in student.oce] == [type(b) for b in net.layer4]
    assert student.oce[0].downsample[0].stride == (2, 2)
    teacher = CNNTeacher(cfg.cnn_teacher, load_weights=False)
    maps = teacher(torch.randn(2, 3, 56, 56))  # 14, 7 and 4 px: the odd 7 is reached from 4 too
    out = student(None, maps)
    assert [o.shape for o in out] == [m.shape for m in maps]


def test_a_wide_resnet50_student_has_rd4ads_widths():
    from plantad.config import CNNTeacherConfig, SNLConfig

    student = ResNetRDStudent(CNNTeacherConfig(weights="random"), SNLConfig())  # the production teacher
    assert [len(s.blocks) for s in student.decoder] == [6, 4, 3] and len(student.oce) == 3
    assert student.oce[-1].conv3.out_channels == 2048  # the embedding has layer4's size
    assert [s.blocks[0].conv2.in_channels for s in student.decoder] == [512, 256, 128]  # twice ResNet-50's widths
    assert [s.blocks[-1].conv3.out_channels for s in student.decoder] == [1024, 512, 256]


def test_rd_without_a_next_stage_for_its_embedding_is_a_clear_error():
    settings = tiny_method_settings("snl_rd", "model.snl.cnn_teacher.stages=[2, 3, 4]")
    with pytest.raises((ValueError, ConfigError), match=r"stages=\[2, 3, 4\].*end at 3 or below"):
        build_model(settings)


@pytest.mark.parametrize("method", ["snl_rd", "snl_fd"])
def test_snl_students_train_with_rd4ads_adam(method):
    settings = tiny_method_settings(method)
    model = build_model(settings)
    opt, sched = build_optimizer(model, settings.train)
    assert type(opt) is torch.optim.Adam  # not AdamW
    (group,) = opt.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"], group["grad_clip"]) == (0.005, (0.5, 0.999), 0.0, None)
    for step in range(3):  # a constant lr, from the first step (no warm-up)
        train_step(model, torch.randn(4, 3, 56, 56), opt, sched, step, settings.train)
        assert group["lr"] == 0.005


@pytest.mark.parametrize("method", ["dual", "dual_snl"])
def test_dual_models_keep_dinomalys_adamw(method):
    settings = tiny_method_settings(method)
    opt, _ = build_optimizer(build_model(settings), settings.train)
    assert type(opt) is torch.optim.AdamW
    assert all(g["betas"] == (0.9, 0.999) and g["weight_decay"] == settings.train.weight_decay
               and g["grad_clip"] == settings.train.grad_clip for g in opt.param_groups)
    assert opt.param_groups[0]["lr"] == pytest.approx(settings.train.lr / settings.train.warmup_steps)  # warm-up


def test_the_snl_optimiser_is_a_setting_with_checked_values():
    settings = tiny_method_settings("snl_rd", "train.snl_optimizer.name=adamw", "train.snl_optimizer.lr=0.001",
                                    "train.snl_optimizer.betas=[0.9, 0.99]")
    opt, _ = build_optimizer(build_model(settings), settings.train)
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ConfigError, match=r"train.snl_optimizer.betas.*\[0, 1\)"):
        tiny_method_settings("snl_rd", "train.snl_optimizer.betas=[0.5, 1.5]")
