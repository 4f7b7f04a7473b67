"""CPU cost of line-health drift tracking per image, as a ratio to scoring the image, measured in one
run on one thread (a replica with num_cpus 1), and the documentation's plot of the drift statistic
over a simulated camera shift.

For each config: a model of its architecture with random teacher weights (this machine cannot
download DINOv2; cost does not depend on the weights) is calibrated on normal demo images, which
also fits its drift reference. Scoring: best of 3 passes of `Predictor.score` over 32 images.
Drift: `LineDrift.record` for every request of 8 images and `LineDrift.test` whenever it is due
(serve.drift defaults), over 4096 scored images on 4 lines, all timed.
Usage: OMP_NUM_THREADS=1 python bench/line_drift.py [--configs params.yaml configs/production.yaml]
       [--plot docs/how-to/line-health-drift.png] [--alarms]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from plantad.config import DemoConfig, DriftConfig, load_settings
from plantad.data.camera_shift import write_line
from plantad.data.demo import generate_demo
from plantad.data.images import ImageTransform
from plantad.data.manifest import scan_dataset
from plantad.evaluation.drift_report import drift_report
from plantad.models.checkpoint import save_model
from plantad.models.factory import build_model
from plantad.serving.drift import LineDrift
from plantad.serving.predictor import Predictor
from plantad.training.calibration import calibrate


def normal_images(folder: Path, per_category: int) -> list[Image.Image]:
    generate_demo(folder, DemoConfig(seed=0, image_size=64, n_train=per_category, n_test_good=1, n_test_defect=1))
    rows = scan_dataset(folder).query("label == 0").sample(frac=1.0, random_state=0)
    return [Image.open(folder / p).convert("RGB") for p in rows["path"]]


def calibrated_predictor(config: str, images: list[Image.Image], out: Path) -> Predictor:
    settings = load_settings(config, ["model.teacher.weights=random"])
    torch.manual_seed(0)
    model = build_model(settings).eval()
    transform = ImageTransform(settings.data.image_size)
    size = settings.scoring.batch_size
    batches = [torch.stack([transform(i) for i in images[s:s + size]]) for s in range(0, len(images), size)]
    calibrate(model, batches, settings.scoring, amp=False)
    save_model(model, settings, out)
    return Predictor.load(str(out))


def cost_ratio(predictor: Predictor, images: list[Image.Image], drift: DriftConfig) -> dict[str, float]:
    batch = images[:32]
    predictor.score(batch)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        scores = predictor.score(batch)
        best = min(best, time.perf_counter() - start)
    score_s = best / len(batch)
    tracker = LineDrift(drift)
    reference, n, tests = predictor.drift_reference, 4096, 0
    start = time.perf_counter()
    for i in range(0, n, 8):
        line = f"line-{(i // 8) % 4}"
        request = [scores[(i + j) % len(scores)] for j in range(8)]
        if tracker.record(line, "1", reference, request):
            tests += tracker.test(line, "1", reference) is not None
    drift_s = (time.perf_counter() - start) / n
    return {"score_ms": score_s * 1e3, "drift_us": drift_s * 1e6, "ratio": drift_s / score_s, "tests": tests}


def alarm_rates(config: str, folder: Path, trials: int = 300, window: int = 64, alpha: float = 0.01) -> None:
    """Share of windows whose test alarms, each against a fresh reference of 192 random normal images:
    windows of normal images of all products (the false-alarm rate), of one product only (a line
    that makes one of the products the model was trained on), and of the mixed images through a
    moved camera (detection)."""
    import numpy as np

    from plantad.data.camera_shift import CameraShift, shifted_image
    from plantad.evaluation.drift import fit_reference, outlier_rank_test
    from plantad.scoring import score_batch

    generate_demo(folder, DemoConfig(seed=0, image_size=64, n_train=200, n_test_good=1, n_test_defect=1))
    rows = scan_dataset(folder).query("label == 0").reset_index(drop=True)
    images = [Image.open(folder / p).convert("RGB") for p in rows["path"]]
    settings = load_settings(config, ["model.teacher.weights=random"])
    torch.manual_seed(0)
    model = build_model(settings).eval()
    transform = ImageTransform(settings.data.image_size)

    def embed(batch: list[Image.Image]) -> np.ndarray:
        return np.concatenate([score_batch(model, torch.stack([transform(i) for i in batch[s:s + 64]]),
                                           settings.scoring, amp=False).embedding.numpy()
                               for s in range(0, len(batch), 64)])
    normal, moved = embed(images), embed([shifted_image(i, CameraShift()) for i in images])
    products = rows["category"].to_numpy()
    rng = np.random.default_rng(0)
    counts = {"mixed": 0, "one product": 0, "moved camera": 0}
    for _ in range(trials):
        order = rng.permutation(len(normal))
        ref_idx, rest = order[:192], order[192:]
        ref = fit_reference(normal[ref_idx], np.zeros(len(ref_idx)), 1.0, settings.scoring.drift_dims, 512,
                            settings.scoring.drift_neighbours)
        product = rng.choice(np.unique(products))
        windows = {"mixed": normal[rng.choice(rest, window, replace=False)],
                   "one product": normal[rng.choice(rest[products[rest] == product], window, replace=False)],
                   "moved camera": moved[rng.choice(rest, window, replace=False)]}
        for name, emb in windows.items():
            counts[name] += outlier_rank_test(ref.calibration_scores, ref.outlier_scores(ref.project(emb))).p_value <= alpha
    print(f"alarm rates of the drift test ({config}, random teacher, {trials} windows of {window}, alpha {alpha}):")
    for name, n in counts.items():
        print(f"  {name}: {n / trials:.3f}")


def plot_simulated_shift(config: str, images: list[Image.Image], reference_n: int, out_png: Path) -> None:
    """Two lines of 384 images through `plantad drift report`'s code: press-1 normal, press-2 normal
    for 192 images and then through a moved camera; the report's figure is copied to `out_png`."""
    with tempfile.TemporaryDirectory(prefix="plantad-drift-plot-") as tmp:
        tmp = Path(tmp)
        calibrated_predictor(config, images[:reference_n], tmp / "model")
        parts = images[reference_n:reference_n + 768]
        if len(parts) < 768:
            raise ValueError(f"the simulated shift needs {reference_n + 768} normal images, got {len(images)}")
        write_line(parts[:384], tmp / "images" / "press-1", None)
        write_line(parts[384:], tmp / "images" / "press-2", 192)
        settings = load_settings(config, [])
        drift_report(tmp / "images", str(tmp / "model"), None, settings.serve.drift, settings.bulk.extensions,
                     tmp / "report", log_to_mlflow=False)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / "report" / "drift_over_time.png", out_png)
        print(f"wrote {out_png} (press-2's camera moves after its 192nd image)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="*", default=["params.yaml", "configs/production.yaml"])
    parser.add_argument("--plot", type=Path, help="write the simulated-shift figure here (params.yaml's model)")
    parser.add_argument("--alarms", action="store_true", help="measure alarm rates (params.yaml's model)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="plantad-drift-bench-") as tmp:
        images = normal_images(Path(tmp) / "demo", 320)
        if args.plot:
            plot_simulated_shift("params.yaml", images, 192, args.plot)
        if args.alarms:
            alarm_rates("params.yaml", Path(tmp) / "alarms")
        print("| config | image px | scoring ms/img | drift tracking us/img | drift/scoring | tests run |")
        print("|---|---|---|---|---|---|")
        for i, config in enumerate(args.configs):
            predictor = calibrated_predictor(config, images[:128], Path(tmp) / f"model-{i}")
            r = cost_ratio(predictor, images[128:], load_settings(config, []).serve.drift)
            print(f"| {config} | {predictor.image_size} | {r['score_ms']:.2f} | {r['drift_us']:.1f} | "
                  f"{r['ratio']:.3%} | {r['tests']} |", flush=True)


if __name__ == "__main__":
    main()
