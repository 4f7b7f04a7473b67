"""Every model.method builds from settings alone, trains every parameter it runs, and scores."""

import logging

import pytest
import torch

from plantad.config import ConfigError
from plantad.models.cnn import CNNTeacher
from plantad.models.factory import build_model
from plantad.models.interface import AnomalyModel, RawScores
from plantad.models.safe_load import file_sha256
from plantad.models.teacher import TeacherLoadError, random_weights_warning
from plantad.scoring import score_batch
from tiny import tiny_method_settings, tiny_settings

# (method, extra settings): the SNL methods on both of their teachers
VARIANTS = [
    ("dual", ()),
    ("dual", ("model.encoder.shared_blocks=2",)),  # the lighter S_E on the teacher's first blocks
    ("dual_snl", ()),
    ("snl_rd", ()),
    ("snl_fd", ()),
    ("snl_rd", ("model.snl.teacher=vit",)),
    ("snl_fd", ("model.snl.teacher=vit",)),
    ("snl_rd", ("model.snl.cram=false",)),
]


def _id(v):
    return "-".join([v[0], *[e.split(".")[-1] for e in v[1]]])


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_every_parameter_that_runs_gets_a_gradient_and_the_teacher_none(variant):
    method, extra = variant
    settings = tiny_method_settings(method, *extra)
    torch.manual_seed(0)
    model = build_model(settings)
    assert isinstance(model, AnomalyModel)
    model.train()
    terms = model(torch.randn(4, 3, 56, 56))
    terms.total.backward()
    trainable = {id(p) for ps in model.student_parameter_groups().values() for p in ps}
    named = dict(model.named_parameters())
    # the optimiser's groups are exactly the trainable parameters (DDP reduces every one of them)
    assert trainable == {id(p) for p in named.values() if p.requires_grad}
    no_grad = [n for n, p in named.items() if p.requires_grad and p.grad is None]
    assert not no_grad, f"{method}: parameters without a gradient (DDP would fail): {no_grad[:5]}"
    assert all(p.grad is None for n, p in named.items() if n.startswith("teacher."))
    assert all(not p.requires_grad for n, p in named.items() if n.startswith("teacher."))


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_every_method_scores_through_the_one_scoring_path(variant):
    method, extra = variant
    settings = tiny_method_settings(method, *extra)
    model = build_model(settings).eval()
    with torch.no_grad():
        raw = model(torch.randn(2, 3, 56, 56))
    assert isinstance(raw, RawScores) and raw.patch_distance.ndim == 3
    assert (raw.semantic is not None) == (settings.model.branches == "dual")
    out = score_batch(model, torch.randn(2, 3, 56, 56), settings.scoring)
    assert out.anomaly_map.shape == (2, 56, 56) and torch.all(torch.isfinite(out.probability))
    if method.startswith("snl"):  # the paper's image score: the maximum of the map
        assert torch.allclose(out.local_score, out.anomaly_map.flatten(1).amax(1))


def test_a_student_equal_to_its_teacher_scores_zero_everywhere():
    settings = tiny_method_settings("snl_fd", "model.snl.teacher=vit")
    torch.manual_seed(0)
    model = build_model(settings).eval()
    missing, _ = model.student.vit.load_state_dict(model.teacher.vit.state_dict(), strict=False)
    assert not missing  # the pruned student is a prefix of the teacher (CRAM starts as the identity)
    with torch.no_grad():
        raw = model(torch.randn(2, 3, 56, 56)).patch_distance
        model.student.crams[0].proj.weight.normal_()  # a CRAM that moves features: distance appears
        moved = model(torch.randn(2, 3, 56, 56)).patch_distance
    assert raw.abs().max() < 1e-4
    assert moved.min() > 1e-3


def test_methods_pick_their_branches_and_wrong_combinations_are_errors():
    assert tiny_settings("model.method=snl_rd").model.branches == "local"
    assert tiny_settings("model.method=snl_fd", "model.branches=null").model.branches == "local"
    assert tiny_settings("model.method=dual_snl").model.branches == "dual"
    assert tiny_settings("model.method=dual_snl", "model.branches=local").model.branches == "local"
    with pytest.raises(ConfigError, match="model.method=snl_rd cannot score with model.branches=semantic"):
        tiny_settings("model.method=snl_rd", "model.branches=semantic")
    with pytest.raises(ConfigError, match="model.method=dual_snl cannot score with model.branches=semantic"):
        tiny_settings("model.method=dual_snl", "model.branches=semantic")
    with pytest.raises(ConfigError, match="model.method.*'dual', 'snl_rd', 'snl_fd' or 'dual_snl'"):
        tiny_settings("model.method=snl")
    with pytest.raises(ConfigError, match="all 0: nothing would be trained"):
        tiny_settings("model.snl.weight_channel=0", "model.snl.weight_spatial=0", "model.snl.weight_intra=0",
                      "model.snl.weight_inter=0")
    with pytest.raises(ConfigError, match="consecutive ResNet stages"):
        tiny_settings("model.snl.cnn_teacher.stages=[1, 3]")


def test_the_production_default_is_the_papers_teacher():
    assert tiny_settings().model.snl.teacher == "cnn"
    from plantad.config import CNNTeacherConfig

    default = CNNTeacherConfig()
    assert (default.name, default.stages, default.weights) == ("wide_resnet50_2", [1, 2, 3], "hub")


def test_cnn_teacher_follows_the_weight_rules(tmp_path, caplog):
    cfg = tiny_method_settings("snl_rd").model.snl.cnn_teacher
    with caplog.at_level(logging.WARNING):
        teacher = CNNTeacher(cfg)
    assert random_weights_warning("model.snl.cnn_teacher.weights", "resnet18") in caplog.text
    assert teacher.identity.source == "random"
    assert teacher.channels == [16, 32, 64]
    missing = cfg.model_copy(update={"weights": str(tmp_path / "nowhere.safetensors")})
    with pytest.raises(TeacherLoadError, match=r"nowhere.safetensors does not exist \(model.snl.cnn_teacher.weights\)"):
        CNNTeacher(missing)
    # a local checkpoint of the same architecture loads, weights and hash recorded
    import timm
    from safetensors.torch import save_file

    net = timm.create_model(cfg.name, pretrained=False, **cfg.timm_kwargs)
    path = tmp_path / "tiny_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    with pytest.raises(TeacherLoadError, match="has no recorded sha256"):  # the same hash pin as the ViT teacher
        CNNTeacher(cfg.model_copy(update={"weights": str(path)}))
    path.with_name(path.name + ".sha256").write_text(f"{file_sha256(path)}  {path.name}\n")
    loaded = CNNTeacher(cfg.model_copy(update={"weights": str(path)}))
    assert loaded.identity.source == "checkpoint" and len(loaded.identity.sha256) == 64
    assert torch.equal(loaded.net.conv1.weight, net.conv1.weight)
    wider = cfg.model_copy(update={"weights": str(path), "timm_kwargs": {**cfg.timm_kwargs, "channels": [32, 64, 128, 256]}})
    with pytest.raises(TeacherLoadError, match="does not fit architecture 'resnet18'"):
        CNNTeacher(wider)


def test_a_non_resnet_cnn_teacher_is_a_clear_error():
    settings = tiny_method_settings("snl_fd", "model.snl.cnn_teacher.name=vit_tiny_patch16_224",
                                    "model.snl.cnn_teacher.timm_kwargs={}")
    with pytest.raises(Exception, match="vit_tiny_patch16_224"):
        build_model(settings)


def test_snl_trains_in_process(demo_root, demo_manifest):
    from plantad.training.loop import build_optimizer, train_step
    from plantad.training.trainer import endless_images, image_loader, normal_train_rows

    settings = tiny_method_settings("snl_rd")
    torch.manual_seed(0)
    model = build_model(settings)
    opt, sched = build_optimizer(model, settings.train)
    batches = endless_images(image_loader(normal_train_rows(demo_manifest), demo_root, settings, shuffle=True))
    losses = [train_step(model, next(batches), opt, sched, s, settings.train)["loss"] for s in range(20)]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
