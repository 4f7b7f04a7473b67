"""OpenVINO rows of bench/vs_anomalib.py: anomalib's Dinomaly exported with its own `to_openvino`, and
plantad's bare teacher as a graph, compiled with the properties read back from plantad's production
graph; and a per-stage profile of both exported graphs from OpenVINO's per-node counters.

The profile compiles each graph once more with `PERF_COUNT` and sums the nodes' times by the module
that produced them: for plantad, the `nn_module_stack` of each node of the decomposed `torch.export`
program OpenVINO converts (the same conversion as `plantad.models.exported`); for Dinomaly, the
`name_scopes` that torch's ONNX exporter writes on each node (anomalib exports ONNX, then converts it).
Nodes OpenVINO adds itself (constants, layout reorders it cannot trace to a source node) stay apart.
"""

from __future__ import annotations

import ast
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from plantad.config import DemoConfig, Settings
from plantad.models.exported import OpenVinoModel, _Forward, _probe_batch, import_nncf, import_openvino

OV_OWN = "OpenVINO's own nodes"
PEER_STAGES = {"pre_processor": "pre-processing (resize to 448, crop 392, normalise)",
               "encoder": "encoder (ViT-S, to its last tapped block)", "bottleneck": "bottleneck + decoder",
               "decoder": "bottleneck + decoder", "post_processor": "post-processing (normalise, threshold)"}
PEER_MAPS = "maps, blur, top-1% score"
PLANTAD_STAGES = {"teacher": "teacher", "decoder": "S_D bottleneck + decoder", "encoder": "S_E"}
PLANTAD_MAPS = "distances (S_D map, S_E distance)"
COMPRESSIONS = {"default precision": None, "FP16": "FP16", "INT8 weights": "INT8", "INT8_PTQ": "INT8_PTQ"}


def compile_config(graph: OpenVinoModel) -> dict[str, Any]:
    """The properties plantad's runtime compiled its graph with, read back from the compiled graph."""
    return {key: graph.compiled.get_property(key) for key in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS")}


class Graph:
    """A compiled graph run as plantad's OpenVinoModel runs it: one reused infer request, float32 numpy
    input, outputs copied into torch tensors."""

    def __init__(self, compiled: Any) -> None:
        self.request = compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        result = self.request.infer({0: x.detach().float().contiguous().numpy()})
        return [torch.from_numpy(np.array(v, copy=True)) for v in result.values()]


class _TeacherForward(nn.Module):
    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.teacher(x)
        return (*feats.layers, feats.cls)


def convert(module: nn.Module, probe: torch.Tensor) -> tuple[Any, dict[str, str]]:
    """`module` as an OpenVINO model (torch.export with a free batch, as plantad exports), and each fx
    node's innermost module path, keyed by the node name OpenVINO's names start with."""
    ov = import_openvino()
    from openvino.frontend.pytorch.fx_decoder import TorchFXPythonDecoder

    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(module, (probe,), dynamic_shapes={"x": {0: batch}})
    decoder = TorchFXPythonDecoder.from_exported_program(program)  # what ov.convert_model(program) does
    paths = {node.name: list(node.meta.get("nn_module_stack", {}).values())[-1][0]
             for node in decoder.pt_module.graph.nodes if node.meta.get("nn_module_stack")}
    return ov.convert_model(decoder), paths


def teacher_graph(teacher: nn.Module, size: int, config: dict[str, Any]) -> Graph:
    ov = import_openvino()
    graph, _ = convert(_TeacherForward(teacher).eval(), _probe_batch(size))
    return Graph(ov.Core().compile_model(graph, "CPU", config))


@contextlib.contextmanager
def calibration_folder(size: int, images: int) -> Iterator[Path]:
    """Normal images of plantad's procedural demo (category metal) at the model's input size."""
    from plantad.data.demo import generate_demo

    with tempfile.TemporaryDirectory(prefix="plantad-calib-") as tmp:
        cfg = DemoConfig(image_size=size, categories=["metal"], n_train=images, n_test_good=1, n_test_defect=1)
        yield generate_demo(Path(tmp) / "demo", cfg) / "metal"


def peer_model(encoder_name: str, size: int, no_download: Callable[[], contextlib.AbstractContextManager]) -> Any:
    """anomalib's Dinomaly (its Lightning module, with its default pre- and post-processing)."""
    from anomalib.models import Dinomaly

    # its default pre-processing at any size: resize to 448/392 of the crop, centre-crop to `size`
    pre = Dinomaly.configure_pre_processor(image_size=(round(size * 448 / 392),) * 2, crop_size=size)
    with no_download():
        peer = Dinomaly(encoder_name=encoder_name, pre_processor=pre).eval()
    # finite normalisation statistics and thresholds, as training leaves them (NaN until then, which
    # OpenVINO's INT8 transformations reject); placeholders for random weights, the same cost
    post = peer.post_processor
    for name, value in {"_image_threshold": 0.5, "_pixel_threshold": 0.5, "image_min": 0.0, "image_max": 1.0,
                        "pixel_min": 0.0, "pixel_max": 1.0}.items():
        getattr(post, name).fill_(value)
    return peer


def peer_graphs(peer: Any, size: int, batch: int, config: dict[str, Any], workdir: Path, calib_images: int = 32,
                compressions: dict[str, str | None] = COMPRESSIONS) -> dict[str, Graph]:
    """Dinomaly exported by its own `to_openvino` with each compression type, INT8_PTQ calibrated on
    the demo's normal images, each compiled with `config`."""
    from anomalib.data import Folder
    from anomalib.deploy import CompressionType

    ov = import_openvino()
    core, graphs = ov.Core(), {}
    with calibration_folder(size, calib_images) as root:
        # half of train/good is the validation split nncf calibrates on: normal images only
        data = Folder(name="metal", root=root, normal_dir="train/good", normal_test_dir="test/good",
                      val_split_mode="from_train", val_split_ratio=0.5, train_batch_size=batch,
                      eval_batch_size=batch, num_workers=0, seed=0)
        for label, compression in compressions.items():
            xml = peer.to_openvino(workdir / label.replace(" ", "-"), input_size=(size, size),
                                   compression_type=compression and CompressionType[compression],
                                   datamodule=data if compression == "INT8_PTQ" else None)
            graphs[label] = Graph(core.compile_model(str(xml), "CPU", config))
    return graphs


LEVERS = {  # label -> (compile properties added to plantad's, static input shape)
    "static batch shape": ({}, True),
    "PERFORMANCE_HINT THROUGHPUT": ({"PERFORMANCE_HINT": "THROUGHPUT"}, False),
    "PERFORMANCE_HINT LATENCY": ({"PERFORMANCE_HINT": "LATENCY"}, False),
}


def lever_graphs(graph: OpenVinoModel, shape: tuple[int, ...], config: dict[str, Any]) -> dict[str, OpenVinoModel]:
    """plantad's production graph (the same conversion) compiled with each lever of LEVERS."""
    ov = import_openvino()
    model = graph.model
    graphs = {}
    for label, (extra, static) in LEVERS.items():
        ov_model, _ = convert(_Forward(model, graph.outputs).eval(), _probe_batch(model.image_size))
        if static:
            ov_model.reshape({0: list(shape)})
        compiled = ov.Core().compile_model(ov_model, "CPU", {**config, **extra})
        graphs[label] = OpenVinoModel(model, compiled, graph.outputs, graph.runtime.split()[-1])
    return graphs


def _stage_of(name: str, stages: dict[str, str]) -> str:
    """The stage of an OpenVINO node: its name up to the first '/' is a source node's name, or ends
    with one (a reorder OpenVINO inserted before it)."""
    key = name.split("/")[0]
    if key in stages:
        return stages[key]
    ends = [n for n in stages if key.endswith("_" + n)]
    return stages[max(ends, key=len)] if ends else OV_OWN


def plantad_stages(paths: dict[str, str]) -> dict[str, str]:
    def stage(path: str) -> str:
        parts = path.split(".")
        return PLANTAD_STAGES.get(parts[1], PLANTAD_MAPS) if len(parts) > 1 and parts[0] == "model" else PLANTAD_MAPS
    return {name: stage(path) for name, path in paths.items()}


def peer_stages(onnx_path: Path) -> dict[str, str]:
    import onnx

    stages = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        # the module path from the root, then the node: ['', 'model', 'encoder', ..., 'linear_3']
        parts = [part for scope in ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))[:-1]
                 for part in scope.split(".")]
        owner = next((part for part in parts if part in PEER_STAGES), "model" if "model" in parts else "")
        stage = PEER_STAGES.get(owner, PEER_MAPS if owner == "model" else "other")
        for name in (node.name, *node.output):
            stages[name] = stage
    return stages


def profile(compiled: Any, stages: dict[str, str], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Seconds per stage for one batch (each stage's best of `rounds`), from the per-node counters."""
    request = compiled.create_infer_request()
    data = {0: x.detach().float().contiguous().numpy()}
    request.infer(data)  # warm-up
    runs = []
    for _ in range(rounds):
        request.infer(data)
        per_stage: dict[str, float] = {}
        for node in request.profiling_info:
            stage = _stage_of(node.node_name, stages)
            per_stage[stage] = per_stage.get(stage, 0.0) + node.real_time.total_seconds()
        runs.append(per_stage)
    return {stage: min(r.get(stage, 0.0) for r in runs) for stage in runs[0]}


def plantad_profile(graph: OpenVinoModel, settings: Settings, x: torch.Tensor, config: dict[str, Any],
                    rounds: int) -> dict[str, float]:
    """Per-stage seconds of plantad's production graph, plus what score_batch does after it in torch."""
    from plantad.scoring import map_sigma, smooth_map

    ov = import_openvino()
    model = graph.model
    ov_model, paths = convert(_Forward(model, graph.outputs).eval(), _probe_batch(model.image_size))
    compiled = ov.Core().compile_model(ov_model, "CPU", {**config, "PERF_COUNT": True})
    times = profile(compiled, plantad_stages(paths), x, rounds)
    raw = graph(x)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        amap = smooth_map(raw.patch_distance.float(), model.image_size, map_sigma(settings.scoring.gaussian_sigma,
                                                                                   model.image_size))
        local = model.image_score(amap, settings.scoring)
        model.noisy_or.probabilities(local, raw.semantic.float())
        best = min(best, time.perf_counter() - t)
    times["blur, top-1% score, Noisy-OR (torch, after the graph)"] = best
    return times


def peer_profile(peer: Any, size: int, x: torch.Tensor, config: dict[str, Any], rounds: int) -> dict[str, float]:
    """Per-stage seconds of anomalib's exported Dinomaly: its ONNX export converted as to_openvino does."""
    ov = import_openvino()
    with tempfile.TemporaryDirectory(prefix="plantad-peer-onnx-") as tmp:
        onnx_path = peer.to_onnx(tmp, input_size=(size, size))
        compiled = ov.Core().compile_model(ov.convert_model(onnx_path), "CPU", {**config, "PERF_COUNT": True})
        stages = peer_stages(onnx_path)
    return profile(compiled, stages, x, rounds)


def report_profile(title: str, times: dict[str, float], batch: int) -> None:
    total = sum(times.values())
    print(f"\n{title}: ms per batch of {batch} (OpenVINO per-node counters, best of the rounds per stage)")
    print("| stage | ms | share |\n|---|---|---|")
    for stage, seconds in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"| {stage} | {seconds * 1e3:.0f} | {seconds / total:.0%} |")
    print(f"| sum | {total * 1e3:.0f} | 100% |", flush=True)


WEIGHTS = {  # label -> how the production graph's weights are stored before compiling
    "fp32 weights (saved with compress_to_fp16=False)": "f32",
    "INT8_PTQ (NNCF, calibrated on normal demo images)": "int8",
}


@contextlib.contextmanager
def demo_images(size: int, normal: int, test: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The procedural demo (category metal) at the model's input size, as plantad loads images:
    `normal` train/good images (calibration), and the test images (`test` good, `test` of each defect type), labels."""
    from plantad.data.dataset import ManifestDataset
    from plantad.data.demo import generate_demo
    from plantad.data.manifest import scan_dataset

    with tempfile.TemporaryDirectory(prefix="plantad-calib-") as tmp:
        cfg = DemoConfig(image_size=size, categories=["metal"], n_train=normal, n_test_good=test, n_test_defect=test)
        root = generate_demo(Path(tmp) / "demo", cfg)
        rows = scan_dataset(root)

        def load(split) -> tuple[torch.Tensor, torch.Tensor]:
            ds = ManifestDataset(rows[rows.split == split].reset_index(drop=True), root, size)
            items = [ds[i] for i in range(len(ds))]
            return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])

        train, _ = load("train")
        yield (train, *load("test"))


def weight_graphs(graph: OpenVinoModel, normal: torch.Tensor, config: dict[str, Any]) -> dict[str, OpenVinoModel]:
    """plantad's production graph (the same conversion) with each weight storage of WEIGHTS, compiled
    with `config`: float32 weights as converted, or NNCF's INT8 post-training quantization (weights and
    activations; transformer preset) with its ranges taken from `normal` images only."""
    ov = import_openvino()
    model = graph.model
    graphs = {}
    for label, weights in WEIGHTS.items():
        ov_model, _ = convert(_Forward(model, graph.outputs).eval(), _probe_batch(model.image_size))
        if weights == "int8":
            nncf = import_nncf()  # its telemetry off, as plantad's int8 graphs
            data = nncf.Dataset([image[None].numpy() for image in normal])
            ov_model = nncf.quantize(ov_model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(normal))
        compiled = ov.Core().compile_model(ov_model, "CPU", config)
        graphs[label] = OpenVinoModel(model, compiled, graph.outputs, graph.runtime.split()[-1])
    return graphs
