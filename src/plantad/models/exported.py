"""The scoring forward as an OpenVINO graph (`scoring.runtime: openvino`), for CPU scoring.

Only the network's forward (teacher, students, distances) moves to OpenVINO; smoothing, image
score, Noisy-OR and threshold stay in `plantad.scoring.score_batch`, so the scoring contract is the
same. The graph is exported once per model file with `torch.export` (any batch size) and kept in
a cache keyed by model.pt's sha256, the image size, the weight storage (`scoring.openvino_weights`),
the graph's format and the OpenVINO version. Every load checks the graph against the torch forward on a fixed batch; a
graph that disagrees is exported again, and when OpenVINO is missing, the export fails or the check
still fails, scoring stays on torch with a warning that says why (the scores are the same within
tolerance, only slower). An int8 graph (NNCF post-training quantization) takes its activation ranges
from every second of the held-out normal images the model ships (`normal_sample`, kept at
calibration) and is checked on the others: its probabilities must stay within
`scoring.int8_tolerance` of torch's, else the fp16 graph scores instead, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plantad.config import ScoringConfig
from plantad.data.images import as_uint8, normalised
from plantad.models.device import autocast, compute_threads, model_device
from plantad.models.interface import RawScores
from plantad.scoring import score_batch

log = logging.getLogger(__name__)
GRAPH_FILE = "model.xml"
# raised when the exported computation changes for the same model file, so caches export it again
# (2: the teacher's and S_E's last block for the class token alone, models/class_token.py)
GRAPH_FORMAT = 2
# a graph must reproduce the torch forward within this fraction of the largest |value| (plus a
# small absolute slack for distances near 0), in the precision scoring runs in
TOLERANCE = {"f32": (5e-3, 1e-4), "bf16": (5e-2, 2e-3)}
NORMAL_SAMPLE_IMAGES = 16  # held-out normal images a model ships for int8 calibration (8) and its check (8)


class ExportError(RuntimeError):
    """The model's forward could not be turned into a checked OpenVINO graph."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "plantad" / "openvino"  # one per node, like the teacher cache


class OpenVinoModel(nn.Module):
    """A loaded model whose forward runs the compiled graph; every other attribute (image_size,
    noisy_or, image_score, teacher, ...) is the torch model's, so score_batch treats both alike."""

    def __init__(self, model: nn.Module, compiled: Any, outputs: tuple[str, ...], precision: str) -> None:
        super().__init__()
        self.model = model
        self.compiled = compiled
        self.outputs = outputs
        self.runtime = f"openvino {precision}"
        # idle infer requests, reused: a request keeps its activation buffers (about 2 GB for 32
        # images at 392 px), and allocating them afresh per call page-faults the whole buffer in
        # again, which took seconds per batch under Serve. One request per concurrent caller.
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def forward(self, x: torch.Tensor) -> RawScores:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:  # a Serve replica may score two batches at once
            request = self.compiled.create_infer_request()
        try:
            result = request.infer({0: x.detach().float().cpu().contiguous().numpy()})
            values = {name: torch.from_numpy(result[i].copy()) for i, name in enumerate(self.outputs)}
        finally:
            self._idle.put(request)
        return RawScores(*(values.get(name) for name in RawScores._fields))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


def runtime_of(model: nn.Module) -> str:
    """What runs the forward, as /model and the benches report it: "openvino <precision>" or "torch"."""
    return model.runtime if isinstance(model, OpenVinoModel) else "torch"


class _Forward(nn.Module):
    """What the graph computes: the eval forward's tensors, without the branches a model lacks."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.model(x)
        return tuple(getattr(raw, name) for name in self.outputs)


def for_scoring(model: nn.Module, cfg: ScoringConfig, model_sha256: str | None,
                cache_dir: Path | None = None) -> nn.Module:
    """The model as scoring should run it: the OpenVINO graph when `cfg.runtime` asks for it and
    the model is on a CPU, else the model itself (with a warning when the graph is unusable)."""
    if cfg.runtime == "torch":
        return model
    if model_device(model).type != "cpu":
        return model  # CUDA: torch's bf16 autocast (train.amp) is the fast path there
    try:
        return openvino_model(model, cfg, model_sha256, cache_dir or default_cache_dir())
    except ExportError as exc:
        if cfg.openvino_weights == "int8":
            log.warning("scoring.openvino_weights is int8 but %s; scoring with the fp16 graph instead", exc)
            return for_scoring(model, cfg.model_copy(update={"openvino_weights": "fp16"}), model_sha256, cache_dir)
        log.warning("scoring.runtime is openvino but %s; scoring with torch instead (same scores, slower)", exc)
        return model


def openvino_model(model: nn.Module, cfg: ScoringConfig, model_sha256: str | None, cache_dir: Path) -> OpenVinoModel:
    ov = import_openvino()
    model.eval()
    core = ov.Core()
    precision = "bf16" if cfg.cpu_amp and "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
    probe = _probe_batch(model.image_size)
    with torch.no_grad(), autocast(probe.device, False, cfg.cpu_amp):
        reference = model(probe)
    outputs = tuple(name for name, value in zip(RawScores._fields, reference) if value is not None)
    weights = cfg.openvino_weights
    normal = normal_images(model) if weights == "int8" else None
    key = (f"{model_sha256}-{model.image_size}px-{weights}-g{GRAPH_FORMAT}-ov{ov.__version__.split('-')[0]}"
           if model_sha256 else None)
    folder = cache_dir / key if key else None
    problem = ""
    for attempt in ("cache", "export"):
        if attempt == "cache" and (folder is None or not (folder / GRAPH_FILE).is_file()):
            continue
        try:
            if attempt == "export":
                folder = _export(model, outputs, probe, cache_dir, key, weights, normal)
            try:
                compiled = core.compile_model(str(folder / GRAPH_FILE), "CPU", {
                    "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": compute_threads()})
            finally:
                if key is None:  # a compiled graph holds its weights: an uncached export can go
                    shutil.rmtree(folder, ignore_errors=True)
            candidate = OpenVinoModel(model, compiled, outputs, precision if normal is None else f"int8+{precision}")
            problem = (_disagreement(candidate(probe), reference, precision) if normal is None
                       else probability_drift(candidate, model, normal[1::2], cfg))
        except ExportError:
            raise
        except Exception as exc:  # a torn or foreign cache entry, an op OpenVINO cannot compile
            problem = f"{type(exc).__name__}: {exc}"
        if not problem:
            return candidate
        log.info("OpenVINO graph from the %s is unusable (%s)", attempt, problem)
    raise ExportError(f"its OpenVINO graph does not reproduce the torch forward ({problem})")


def _probe_batch(size: int) -> torch.Tensor:
    """Two fixed images in normalised space (the export needs a batch above 1 to keep it free)."""
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def normal_sample(batches: list[torch.Tensor], n: int = NORMAL_SAMPLE_IMAGES) -> torch.Tensor:
    """Up to `n` of the held-out normal images (normalised batches), spread over all of them, as
    uint8 (n, 3, S, S): what a model ships to calibrate and check an int8 graph with."""
    images = torch.cat([b.detach().float().cpu() for b in batches])
    return as_uint8(images[:: max(1, len(images) // n)][:n])


def normal_images(model: nn.Module) -> torch.Tensor:
    """The model's shipped normal images, normalised as scoring normalises its input."""
    sample = getattr(model, "normal_sample", None)
    if sample is None or len(sample) < 2:
        raise ExportError("this model ships no held-out normal images to calibrate an int8 graph with "
                          "(saved before plantad kept them at calibration); train or calibrate it again")
    return normalised(sample)


def probability_drift(graph: OpenVinoModel, model: nn.Module, images: torch.Tensor, cfg: ScoringConfig) -> str:
    """Why the graph's probabilities on `images` are not torch's within `cfg.int8_tolerance`, or ""."""
    torch_cfg = cfg.model_copy(update={"runtime": "torch"})
    gap = float((score_batch(graph, images, torch_cfg).probability
                 - score_batch(model, images, torch_cfg).probability).abs().max())
    if not gap <= cfg.int8_tolerance:
        return (f"its probabilities on {len(images)} held-out normal images differ from torch's by {gap:.3g} "
                f"(allowed: scoring.int8_tolerance={cfg.int8_tolerance:g})")
    return ""


def _disagreement(got: RawScores, want: RawScores, precision: str) -> str:
    rtol, atol = TOLERANCE[precision]
    for name, a, b in zip(RawScores._fields, got, want):
        if b is None:
            continue
        b = b.float()
        if a is None or a.shape != b.shape:
            return f"{name}: shape {None if a is None else tuple(a.shape)} instead of {tuple(b.shape)}"
        gap, scale = float((a - b).abs().max()), float(b.abs().max())
        if not gap <= rtol * scale + atol:
            return f"{name} differs by {gap:.3g} (allowed {rtol * scale + atol:.3g}, {precision})"
    return ""


def _export(model: nn.Module, outputs: tuple[str, ...], probe: torch.Tensor, cache_dir: Path,
            key: str | None, weights: str = "fp16", normal: torch.Tensor | None = None) -> Path:
    """Export, convert and save the graph; into the cache (atomically, one writer at a time) when
    the model has a key, else into a temporary folder."""
    from filelock import FileLock

    ov = import_openvino()

    cache_dir.mkdir(parents=True, exist_ok=True)
    if key is None:
        folder = Path(tempfile.mkdtemp(prefix="plantad-openvino-"))
        _convert(model, outputs, probe, folder, weights, normal)
        return folder
    final = cache_dir / key
    with FileLock(str(cache_dir / f"{key}.lock")):
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
        try:
            _convert(model, outputs, probe, staging, weights, normal)
            if final.exists():  # a stale or damaged entry: this load is replacing it
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("exported the scoring graph to %s (OpenVINO %s)", final, ov.__version__)
    return final


def _convert(model: nn.Module, outputs: tuple[str, ...], probe: torch.Tensor, folder: Path,
             weights: str = "fp16", normal: torch.Tensor | None = None) -> None:
    ov = import_openvino()
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with torch.no_grad():
            program = torch.export.export(_Forward(model, outputs), (probe,), dynamic_shapes={"x": {0: batch}})
        graph = ov.convert_model(program)
    except Exception as exc:
        raise ExportError(f"the forward of this model cannot be exported ({type(exc).__name__}: {exc})") from exc
    if weights == "int8":
        nncf = import_nncf()
        images = [image[None].numpy() for image in normal[0::2]]  # every second shipped image
        graph = nncf.quantize(graph, nncf.Dataset(images), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(images))
    # bf16 or f32 is chosen when compiling, not here; fp16 weights are decompressed then
    ov.save_model(graph, str(folder / GRAPH_FILE), compress_to_fp16=weights == "fp16")


def import_openvino() -> Any:
    """OpenVINO with its usage telemetry off. Its converter reports to Google Analytics on import
    and on every conversion unless a user opted out, and a plant's scoring node must not call out:
    with its telemetry package blocked during the first import, OpenVINO binds its built-in stub."""
    with _no_telemetry("openvino"):
        try:
            import openvino
        except ImportError as exc:
            raise ExportError("the openvino package is not installed (pip install 'plantad[openvino]')") from exc
    return openvino


def import_nncf() -> Any:
    """NNCF (int8 quantization), with its Google Analytics telemetry off the same way: without the
    telemetry package at its first import, NNCF binds its stub."""
    import_openvino()
    with _no_telemetry("nncf"):
        try:
            import nncf
        except ImportError as exc:
            raise ExportError("scoring.openvino_weights is int8 but the nncf package is not installed "
                              "(pip install 'plantad[openvino]')") from exc
    return nncf


@contextlib.contextmanager
def _no_telemetry(package: str) -> Any:
    first = package not in sys.modules
    saved = sys.modules.get("openvino_telemetry", False)
    if first:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import -> ImportError -> stub
    try:
        yield
    finally:
        if first and saved is False:
            del sys.modules["openvino_telemetry"]
        elif first:
            sys.modules["openvino_telemetry"] = saved
