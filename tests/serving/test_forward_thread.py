"""A serving process keeps one OpenMP team (its forward thread's), and inputs prepared ahead of the
batch score exactly like the images they came from."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from plantad.data.images import ImageTransform, load_rgb
from plantad.serving.predictor import Predictor, prepare

# a fresh process: installing the forward thread changes the threads of the whole process
TEAMS = textwrap.dedent("""
    import json, os, sys, threading
    import torch

    torch.set_num_threads(2)
    forward = None
    if sys.argv[1] == "install":
        from plantad.serving.forward import install_forward_thread
        forward = install_forward_thread(2)

    def parallel_op():
        torch.randn(4_000_000).exp_()  # split over the calling thread's OpenMP team

    counts = {}
    if forward is not None:
        forward.run(parallel_op)  # its team exists before the count
        counts["forward"] = forward.run(torch.get_num_threads)
    go, done, hold = threading.Barrier(4), threading.Barrier(4), threading.Event()

    def other():
        go.wait()
        parallel_op()
        counts[threading.get_ident()] = torch.get_num_threads()
        done.wait()
        hold.wait()

    threads = [threading.Thread(target=other) for _ in range(3)]
    for t in threads:
        t.start()
    before = len(os.listdir("/proc/self/task"))
    go.wait()
    done.wait()
    after = len(os.listdir("/proc/self/task"))
    hold.set()
    for t in threads:
        t.join()
    print(json.dumps({"extra_threads": after - before, "forward": counts.pop("forward", None),
                      "others": sorted(counts.values()), "caller": torch.get_num_threads()}))
""")


def _teams(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", TEAMS, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
def test_torch_ops_outside_the_forward_thread_start_no_openmp_team():
    plain = _teams("plain")
    # without it, every thread that runs a parallel op starts a team of its own (what slowed forwards)
    assert plain["extra_threads"] >= 3, plain
    assert plain["others"] == [2, 2, 2], plain
    served = _teams("install")
    assert served["forward"] == 2, served
    assert served["others"] == [1, 1, 1] and served["caller"] == 1, served
    assert served["extra_threads"] == 0, served


def test_prepared_inputs_score_like_the_images(trained_tiny, demo_root, demo_manifest):
    settings, result = trained_tiny
    rows = demo_manifest[demo_manifest["split"] == "test"].head(6)
    images = [load_rgb(demo_root / p) for p in rows["path"]]
    predictor = Predictor.load(str(result.model_path.parent))
    plain = predictor.score(images, with_maps=True)
    prepared = predictor.score(prepare(images, predictor.transform), with_maps=True)
    assert [s.probability for s in prepared] == [s.probability for s in plain]
    np.testing.assert_array_equal(prepared[0].anomaly_map, plain[0].anomaly_map)
    # prepared for another input size (a version swapped in between): the image is transformed again
    other = prepare(images, ImageTransform(settings.data.image_size // 2))
    assert other[0].input.shape[-1] != predictor.image_size
    assert [s.probability for s in predictor.score(other)] == [s.probability for s in plain]
