"""`plantad drift report`: the line-health drift test over a folder of images, one line per
top-level sub-folder, as an HTML page with its figures, logged to MLflow on the version's run.

Each line's images, in the order they were written (file modification time), are cut into windows
of `serve.drift.window_images` and every window is tested as a replica tests it (evaluation/drift.py);
the whole line is tested once too. Scores come from `Predictor.score`, the serving path.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from plantad.config import DriftConfig
from plantad.data.images import decode_image_bytes
from plantad.evaluation.drift import DriftReference, WindowDrift, window_drift
from plantad.serving.predictor import Predictor

log = logging.getLogger(__name__)
NO_LINE = "unspecified"  # images directly in the folder, as the server labels requests without a line


@dataclass(frozen=True)
class LineImages:
    line: str
    paths: list[Path]  # oldest first


@dataclass(frozen=True)
class LineReport:
    line: str
    images: int
    overall: WindowDrift  # the whole line's images as one window
    windows: list[WindowDrift]  # consecutive windows, oldest first
    probabilities: np.ndarray


def line_images(folder: Path, extensions: list[str], since: datetime | None = None) -> list[LineImages]:
    """Images under `folder` by line (top-level sub-folder), oldest first; only those modified at or
    after `since` when given."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder} is not a folder")
    exts = {e.lower() for e in extensions}
    cutoff = since.timestamp() if since is not None else None
    lines: dict[str, list[tuple[float, Path]]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in exts:
            continue
        mtime = path.stat().st_mtime
        if cutoff is not None and mtime < cutoff:
            continue
        rel = path.relative_to(folder)
        line = rel.parts[0] if len(rel.parts) > 1 else NO_LINE
        lines.setdefault(line, []).append((mtime, path))
    if not lines:
        after = f" modified since {since.isoformat()}" if since else ""
        raise ValueError(f"no images ({', '.join(sorted(exts))}) under {folder}{after}")
    return [LineImages(line, [p for _, p in sorted(items)]) for line, items in sorted(lines.items())]


def score_line(predictor: Predictor, reference: DriftReference | None, images: LineImages, cfg: DriftConfig,
               chunk: int = 64) -> LineReport:
    """Score a line's images with the version and test its windows and the whole line."""
    projected, probs, anomalous = [], [], []
    for start in range(0, len(images.paths), chunk):
        batch = [decode_image_bytes(p.read_bytes(), str(p)) for p in images.paths[start:start + chunk]]
        for s in predictor.score(batch):
            probs.append(s.probability)
            anomalous.append(s.is_anomalous)
            projected.append(None if reference is None or s.embedding is None else reference.project(s.embedding[None])[0])
    vectors = None if any(v is None for v in projected) else np.stack(projected)
    return line_report(images.line, reference, vectors, np.array(probs), np.array(anomalous, dtype=bool), cfg)


def line_report(line: str, reference: DriftReference | None, vectors: np.ndarray | None, prob: np.ndarray,
                anom: np.ndarray, cfg: DriftConfig) -> LineReport:
    """Test a line's consecutive windows and the whole line: (N, D) drift coordinates (None: the model
    gives no embeddings), (N,) probabilities and decisions, oldest first."""
    now = datetime.now().timestamp()

    def test(sl: slice) -> WindowDrift:
        return window_drift(reference, None if vectors is None else vectors[sl], prob[sl], anom[sl], cfg.alpha, now)
    size = cfg.window_images
    windows = [test(slice(s, s + size)) for s in range(0, len(prob) - size + 1, size)]
    return LineReport(line, len(prob), test(slice(None)), windows, prob)


def plot_drift_over_time(reports: list[LineReport], alpha: float, window: int, path: Path, title: str) -> Path:
    """Per line, the AUC and the -log10 p-value of each consecutive window (the drift statistic as a
    replica computes it) at the window's last image, with the alarm level."""
    from plantad.evaluation.plots import _figure, _save

    fig = _figure(9.0, 4.5, layout="constrained")
    ax_auc, ax_p = fig.subplots(1, 2)
    for r in reports:
        x = window * np.arange(1, len(r.windows) + 1)
        ax_auc.plot(x, [w.auc if w.auc is not None else np.nan for w in r.windows], marker="o", label=r.line)
        ax_p.plot(x, [-np.log10(w.p_value) if w.p_value is not None else np.nan for w in r.windows], marker="o",
                  label=r.line)
    ax_auc.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax_auc.set(xlabel="images of the line (end of window)", ylabel="AUC of outlier scores vs normal",
               ylim=(0.0, 1.0))
    ax_p.axhline(-np.log10(alpha), color="red", linestyle="--", linewidth=1, label=f"alarm (alpha={alpha})")
    ax_p.set(xlabel="images of the line (end of window)", ylabel="-log10 p-value")
    ax_p.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_probabilities(reports: list[LineReport], reference: DriftReference | None, path: Path) -> Path:
    from plantad.evaluation.plots import _figure, _save

    fig = _figure(6.0, 4.0, layout="constrained")
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 41)
    if reference is not None:
        ax.hist(reference.probabilities, bins=bins, density=True, histtype="stepfilled", alpha=0.3, color="grey",
                label="reference (held-out normal)")
    for r in reports:
        ax.hist(r.probabilities, bins=bins, density=True, histtype="step", linewidth=1.5, label=r.line)
    ax.set(xlabel="anomaly probability", ylabel="density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write_report(reports: list[LineReport], predictor: Predictor, cfg: DriftConfig, out: Path,
                 source: str) -> Path:
    """report.html with drift_over_time.png and probabilities.png beside it, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    reference = predictor.drift_reference
    who = predictor.ref.describe()
    plot_drift_over_time(reports, cfg.alpha, cfg.window_images, out / "drift_over_time.png",
                         f"drift test per window of {cfg.window_images} images")
    plot_probabilities(reports, reference, out / "probabilities.png")
    rows = "".join(
        f"<tr><td>{html.escape(r.line)}</td><td>{r.images}</td><td>{_fmt(r.overall.auc, '.3f')}</td>"
        f"<td>{_fmt(r.overall.p_value, '.2g')}</td><td>{'DRIFT' if r.overall.drifted else 'ok'}</td>"
        f"<td>{sum(w.drifted for w in r.windows)} / {len(r.windows)}</td><td>{_fmt(r.overall.score_shift, '.3f')}</td>"
        f"<td>{r.overall.reject_rate:.3f}</td></tr>" for r in reports)
    ref_line = ("the version has no drift reference (trained before plantad stored one): only probabilities are "
                "compared" if reference is None else
                f"reference: {reference.images} held-out normal images, reject rate {reference.reject_rate:.3f}")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>plantad drift report</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}</style></head>
<body><h1>Drift report: {html.escape(who)}</h1>
<p>Images: {html.escape(source)}. Written {datetime.now().astimezone().isoformat(timespec="seconds")}.
{html.escape(ref_line)}. Test: AUC of k-NN outlier scores against held-out normal images, one-sided
Mann-Whitney p-value, drift at p &le; {cfg.alpha}; windows of {cfg.window_images} images, oldest first.</p>
<table><tr><th>line</th><th>images</th><th>AUC</th><th>p-value</th><th>whole line</th><th>windows with drift</th>
<th>score shift (KS)</th><th>reject rate</th></tr>{rows}</table>
<h2>Drift statistic per window</h2><img src="drift_over_time.png" alt="drift per window">
<h2>Probabilities</h2><img src="probabilities.png" alt="probabilities"></body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def log_report(out: Path, predictor: Predictor, tracking_uri: str | None) -> str | None:
    """Log the report folder to the run of the served version (artifact `drift/<time>/`) and tag the
    version with where it is; None for a model folder, which has no run."""
    ref = predictor.ref
    if not ref.registered or not ref.run_id:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    artifact_path = f"drift/{datetime.now().strftime('%Y%m%dT%H%M%S')}"
    client.log_artifacts(ref.run_id, str(out), artifact_path)
    where = f"runs:/{ref.run_id}/{artifact_path}/report.html"
    client.set_model_version_tag(ref.name, str(ref.version), "drift_report", where)
    return where


def drift_report(folder: Path, model_uri: str, tracking_uri: str | None, cfg: DriftConfig, extensions: list[str],
                 out: Path, since: datetime | None = None, log_to_mlflow: bool = True) -> tuple[Path, str | None]:
    """Score `folder`'s images with `model_uri`, write the report into `out`, log it to MLflow."""
    lines = [li for li in line_images(folder, extensions, since) if len(li.paths) >= 2]
    if not lines:
        raise ValueError(f"every line under {folder} has fewer than 2 images: nothing to test")
    predictor = Predictor.load(model_uri, tracking_uri)
    if predictor.drift_reference is None:
        log.warning("%s has no drift reference: the report compares probabilities only", predictor.ref.describe())
    reports = [score_line(predictor, predictor.drift_reference, li, cfg) for li in lines]
    path = write_report(reports, predictor, cfg, out, f"{folder}" + (f" since {since.isoformat()}" if since else ""))
    logged = log_report(out, predictor, tracking_uri) if log_to_mlflow else None
    return path, logged
