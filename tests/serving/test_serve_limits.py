"""What bounds a replica's work and memory, without a cluster: the per-request pixel budget checked
on each image's header, the decode threads, bounded heatmaps, thresholds, a 500's body, auth that
fails closed, and the memory check of a model swap."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.requests import Request

from plantad.config import ConfigError, ServeConfig, serve_config_from_dict
from plantad.serving.inputs import (ApiError, decode_all, decode_executor, internal_error, parse_score_request,
                                    parse_threshold)
from plantad.serving.memory import SwapDoesNotFit, check_swap_fits, measure_growth, swap_room, tensor_bytes
from plantad.serving.render import heatmap_overlay_png
from plantad.serving.security import SecretError, check_auth_closed

MIB = 2 ** 20


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_image_that_would_pass_the_pixel_budget_gets_413_before_it_is_decoded():
    cfg = ServeConfig(max_image_pixels=12_000, max_request_pixels=15_000)
    truncated = png(100, 100)[:60]  # header intact, pixels cut off: decoding it would answer 400
    assert decode_all([("t.png", truncated)], cfg)[0].status == 400
    items = decode_all([("a.png", png(100, 100)), ("b.png", truncated), ("c.png", png(100, 100)),
                        ("d.png", png(20, 20))], cfg)
    assert [item.status for item in items] == [200, 413, 413, 200]
    assert items[1].error == ("b.png: its 10000 pixels would bring the request to 20000 decoded pixels, over the "
                              "limit of 15000 per request (serve.max_request_pixels)")
    assert items[3].decoded is not None and items[3].decoded.width == 20  # a smaller one still fits
    with pytest.raises(ConfigError, match=r"serve.max_image_pixels \(50\) is above serve.max_request_pixels \(40\)"):
        serve_config_from_dict({"max_image_pixels": 50, "max_request_pixels": 40}, "args")


def _json_request(doc: dict) -> Request:
    body = json.dumps(doc).encode()
    sent = []

    async def receive() -> dict:
        sent.append(True)
        return {"type": "http.request", "body": body if len(sent) == 1 else b"", "more_body": False}

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/score", "headers": headers, "query_string": b""},
                   receive)


def test_images_are_decoded_on_the_replicas_own_threads_one_per_cpu():
    import base64

    assert [decode_executor(n)._max_workers for n in (0.25, 1.0, 1.5, 4.0)] == [1, 1, 2, 4]
    executor = decode_executor(0.5)
    try:
        doc = {"images": [base64.b64encode(png(32, 32)).decode()] * 3, "threshold": 0.25}
        parsed = asyncio.run(parse_score_request(_json_request(doc), ServeConfig(), executor))
        assert [item.status for item in parsed.images] == [200, 200, 200] and parsed.threshold == 0.25
        assert [t.name for t in executor._threads] == ["plantad-decode_0"]  # decoded there, on its one thread
    finally:
        executor.shutdown()


def test_heatmaps_are_rendered_at_a_bounded_size():
    amap = np.zeros((16, 16), np.float32)
    amap[2:5, 2:5] = 1.0
    image = Image.new("RGB", (2000, 1000), (0, 0, 0))
    bounded = Image.open(io.BytesIO(heatmap_overlay_png(image, amap, 5.0, max_side=256)))
    assert bounded.size == (256, 128)
    assert Image.open(io.BytesIO(heatmap_overlay_png(image, amap, 5.0))).size == (2000, 1000)  # bulk: full size
    small = Image.open(io.BytesIO(heatmap_overlay_png(Image.new("RGB", (64, 48)), amap, 5.0, max_side=256)))
    assert small.size == (64, 48)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", "-inf", "1e999", True, "abc", [0.5]])
def test_a_threshold_that_is_not_a_finite_number_is_refused_naming_it(value):
    with pytest.raises(ApiError) as err:
        parse_threshold(value, "parameters")
    assert err.value.status == 400 and err.value.message.startswith(f"parameters threshold {value!r} is not")


def test_thresholds_that_are_numbers_pass_and_v2_wants_json_numbers():
    assert parse_threshold("0.25", "form") == 0.25 and parse_threshold(1, "JSON") == 1.0
    assert parse_threshold(None, "JSON") is None
    with pytest.raises(ApiError, match="parameters threshold '0.5' is not a number"):
        parse_threshold("0.5", "parameters", text=False)


def test_a_500_answers_a_request_id_and_logs_the_exception_text_under_it(caplog):
    caplog.set_level(logging.ERROR, logger="plantad.serving.inputs")
    try:
        raise KeyError("/secret/path/model.pt and a value of the request")
    except KeyError:
        body = internal_error("score")
    assert "secret" not in json.dumps(body) and "KeyError" not in json.dumps(body)
    request_id = body["request_id"]
    assert len(request_id) >= 16 and request_id in body["error"]
    record = caplog.records[-1]
    assert request_id in record.getMessage() and "/secret/path/model.pt" in caplog.text


def test_serving_beyond_loopback_without_api_keys_refuses_to_start(monkeypatch):
    from plantad.serving import launch

    monkeypatch.delenv("PLANTAD_TEST_NO_KEYS", raising=False)
    open_cfg = ServeConfig(host="0.0.0.0", api_keys_env="PLANTAD_TEST_NO_KEYS")
    with pytest.raises(SecretError, match="serve.host is 0.0.0.0 .* serve.allow_unauthenticated: true"):
        check_auth_closed(open_cfg, have_keys=False)
    with pytest.raises(SecretError, match="no API key is configured"):  # `plantad serve`: before anything starts
        launch.deploy(open_cfg)
    check_auth_closed(open_cfg, have_keys=True)
    check_auth_closed(open_cfg.model_copy(update={"allow_unauthenticated": True}), have_keys=False)
    check_auth_closed(ServeConfig(host="127.0.0.1"), have_keys=False)
    check_auth_closed(ServeConfig(host="::1"), have_keys=False)


def test_a_swap_that_does_not_fit_the_reservation_is_refused_naming_the_sizes():
    check_swap_fits(900 * MIB, 400 * MIB, 1536 * MIB)
    check_swap_fits(900 * MIB, 4000 * MIB, None)  # nothing reserved: nothing to check against
    with pytest.raises(SwapDoesNotFit) as err:
        check_swap_fits(1200 * MIB, 400 * MIB, 1536 * MIB)
    assert str(err.value).startswith("swap refused: the replica holds 1200 MiB and the new version needs 400 MiB "
                                     "more, 1600 MiB in all, over the 1536 MiB it reserves "
                                     "(serve.ray_actor_options.memory)")
    # what /rollout shows before a promotion says the same as the check the swap makes
    assert swap_room(1200 * MIB, 400 * MIB, 1536 * MIB) == {"resident_mib": 1200, "swap_needs_mib": 1600,
                                                            "reserved_mib": 1536, "swap_fits": False}
    assert swap_room(900 * MIB, 400 * MIB, 1536 * MIB)["swap_fits"] is True
    assert swap_room(900 * MIB, 4000 * MIB, None)["swap_fits"] is None


def test_the_default_reservation_holds_the_swap_measured_on_a_fresh_clone():
    """The main job's replica after one `dvc repro` held 1419 MiB and a swap needed 198 MiB more
    (2026-12-06, docs/explanation/rollout.md): the 1.5 GiB default refused it; the default must not."""
    default = ServeConfig().ray_actor_options.memory
    check_swap_fits(1419 * MIB, 198 * MIB, default)
    with pytest.raises(SwapDoesNotFit):
        check_swap_fits(1419 * MIB, 198 * MIB, 1536 * MIB)


def test_a_versions_footprint_is_measured_from_the_process_memory():
    shared = torch.nn.Linear(500, 500)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)  # one storage, counted once
    assert tensor_bytes(model) == (500 * 500 + 500) * 4
    held, grown = measure_growth(lambda: np.ones(64 * MIB // 8))  # 64 MiB touched
    assert held.nbytes == 64 * MIB and 60 * MIB <= grown <= 80 * MIB



FRESH_LOAD = """
import json, sys
from plantad.serving.memory import measure_growth, predictor_footprint, tensor_bytes
from plantad.serving.predictor import Predictor

def load():
    predictor = Predictor.load(sys.argv[1], device="cpu")
    predictor.warm_up()
    return predictor

predictor, grown = measure_growth(load)
print(json.dumps({"grown": grown, "tensors": tensor_bytes(predictor.model),
                  "footprint": predictor_footprint(predictor.model, grown)}))
"""


def test_a_predictors_footprint_measured_in_a_fresh_process_holds_at_least_its_tensors(tmp_path):
    """A replica's first load, as the holder measures it (load and warm-up in a fresh process)."""
    import subprocess
    import sys

    from tiny import tiny_settings

    from plantad.models.checkpoint import save_model
    from plantad.models.factory import build_model

    settings = tiny_settings("model.teacher.timm_kwargs={depth: 4, embed_dim: 128, num_heads: 4, patch_size: 8, "
                             "init_values: 1.0}")
    model = build_model(settings, load_teacher_weights=False).eval()
    for name in ("threshold", "ema_local", "ema_semantic"):  # calibrated, as save_model requires
        getattr(model.noisy_or, name).fill_(0.5)
    save_model(model, settings, tmp_path / "v1")
    out = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(tmp_path / "v1")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["tensors"] == tensor_bytes(model) > 4 * MIB
    assert m["grown"] >= m["tensors"] and m["footprint"] == m["grown"], m
