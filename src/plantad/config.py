"""Typed settings: params.yaml is read here and nowhere else.

Every knob of the product lives in one YAML file (also DVC's params file). Unknown keys and bad
values are errors that name the dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A params file or override that cannot be turned into settings."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ShardsConfig(_Section):
    """The dataset as Parquet shards (image bytes + manifest columns) that Ray workers read on any node."""

    location: str = "outputs/shards"  # local folder or s3://bucket/prefix; a sub-folder per manifest fingerprint
    max_bytes: int = Field(256_000_000, ge=1)  # image and mask bytes per shard file (one larger image: its own)


class DataConfig(_Section):
    source: Literal["demo", "path"] = "demo"
    root: str = "data/demo"
    categories: list[str] | None = None  # None: every category found under root (multi-class)
    image_size: int = Field(112, ge=14)  # model input side; images are resized to it
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # normal train images kept for calibration
    # at least this many normal train images of each category are held out (all but one when a category
    # has fewer): the conformal threshold promises a false-alarm rate alpha only from 2/alpha - 3 held-out
    # images in all (half fit the fusion, half set the threshold; training/calibration.py)
    holdout_min_images: int = Field(0, ge=0)
    loader_workers: int = Field(0, ge=0)
    shards: ShardsConfig = ShardsConfig()


class DemoConfig(_Section):
    seed: int = 0
    image_size: int = Field(128, ge=32)
    categories: list[Literal["weave", "metal", "nut"]] = ["weave", "metal", "nut"]
    n_train: int = Field(40, ge=2)  # normal training images per category
    n_test_good: int = Field(10, ge=1)
    n_test_defect: int = Field(5, ge=1)  # per defect type and category


SemanticFamily = Literal["gear", "star", "wheel", "cross"]


class SemanticDemoConfig(_Section):
    """`plantad demo-data --semantic`: image-level data, one category per normal object family."""

    image_size: int = Field(128, ge=32)
    categories: list[SemanticFamily] = ["gear", "star", "wheel"]  # each is one category's normal family
    outlier_families: list[SemanticFamily] = ["gear", "star", "wheel", "cross"]  # anomalies (not its own)
    n_train: int = Field(40, ge=2)
    n_test_good: int = Field(10, ge=1)
    n_test_anomalous: int = Field(5, ge=1)  # per outlier family and category

    @model_validator(mode="after")
    def _each_category_has_outliers(self) -> SemanticDemoConfig:
        lonely = [c for c in self.categories if not set(self.outlier_families) - {c}]
        if not self.categories or lonely:
            raise ValueError(f"semantic_demo: categories {lonely or '[]'} have no outlier family to test against")
        return self


REMOTE_WEIGHTS = ("s3://", "models:/", "runs:/")  # teacher weights fetched into each node's cache


def check_weights_pin(weights: str, sha256: str | None, key: str) -> None:
    """A remote teacher checkpoint needs a sha256 pin; a pin is 64 hex digits and pins a file only."""
    if sha256 is not None:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower()):
            raise ValueError(f"{key}.sha256 must be 64 hex digits (sha256sum's output), got {sha256!r}")
        if weights in ("hub", "random"):
            raise ValueError(f"{key}.sha256 pins a checkpoint file, but {key}.weights is {weights!r}")
    elif weights.startswith(REMOTE_WEIGHTS):
        raise ValueError(f"{key}.sha256 is required when {key}.weights is remote ({weights}): set it to the "
                         "checkpoint's sha256 (`plantad teacher publish` prints it)")


class TeacherConfig(_Section):
    name: str = "vit_small_patch14_dinov2"
    # "hub" (timm pretrained, needs network), "random" (explicit, warns loudly), a checkpoint path, or
    # s3://bucket/key, models:/name/version, runs:/run_id/path (fetched once per node, sha256 required)
    weights: str = "hub"
    sha256: str | None = None  # pin of the checkpoint file; required for remote weights
    cache_dir: str | None = None  # where each node keeps fetched checkpoints; None: ~/.cache/plantad/teachers
    layers: list[int] = [2, 3, 4, 5, 6, 7, 8, 9]
    groups: list[list[int]] = [[0, 1, 2, 3], [4, 5, 6, 7]]  # indices into `layers`
    timm_kwargs: dict[str, Any] = {}  # architecture overrides, e.g. depth/embed_dim for tiny models

    @model_validator(mode="after")
    def _groups_index_layers(self) -> TeacherConfig:
        n = len(self.layers)
        flat = [i for g in self.groups for i in g]
        if not self.groups or any(not g for g in self.groups):
            raise ValueError("model.teacher.groups must be non-empty lists of layer indices")
        bad = [i for i in flat if not 0 <= i < n]
        if bad:
            raise ValueError(f"model.teacher.groups index {bad} outside model.teacher.layers (len {n})")
        check_weights_pin(self.weights, self.sha256, "model.teacher")
        return self


class DecoderConfig(_Section):
    mlp_ratio: float = 4.0
    num_heads: int | None = None  # None: the teacher's
    bottleneck_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    linear_attention: bool = True


class EncoderConfig(_Section):
    # trainable blocks of S_E; None: the teacher's depth (paper-faithful S_E), or the teacher's depth
    # minus shared_blocks when S_E shares the teacher's lower blocks
    depth: int | None = Field(None, ge=1)
    # [reconstructed, a speed lever] 0: the paper's S_E, a whole ViT trained from scratch on the image;
    # k > 0: S_E starts from the teacher's tokens after its first k blocks (frozen patch embedding and
    # blocks, taken from the one teacher forward) and trains only its own upper blocks from scratch
    shared_blocks: int = Field(0, ge=0)
    # [reconstructed, a speed lever] the side of the view S_E sees: the model's input downscaled to it
    # (antialiased bilinear, a multiple of the teacher's patch); its target stays the teacher's class
    # token from the full-size pass. None: the model's input size (the paper). Only for shared_blocks 0
    image_size: int | None = Field(None, ge=8)
    # [read] S_E distils the class token only (no identity mapping); True adds the mean patch token
    # [reconstructed], an ablation measured in bench/accuracy.py
    distill_patch_mean: bool = False


class NoisyOrConfig(_Section):
    # [reconstructed] training weights of -log(1 - P) = w_D * s_D + w_E * s_E
    weighting: Literal["fixed", "adaptive"] = "adaptive"
    weight_local: float = Field(1.0, ge=0.0)
    weight_semantic: float = Field(1.0, ge=0.0)
    ema_momentum: float = Field(0.99, ge=0.0, lt=1.0)
    # fusion (models/noisy_or.py): each branch's normal `quantile` maps to `probability`, its median to 0
    # exceedance; the heat map's scale 1 - exp(-lambda * s) maps the same quantile to the same probability
    calibration_quantile: float = Field(0.99, gt=0.0, lt=1.0)
    calibration_probability: float = Field(0.5, gt=0.0, lt=1.0)


class CNNTeacherConfig(_Section):
    """The CNN teacher of SNL's FD/RD baselines (timm ResNet family; WideResNet-50 in the paper [read])."""

    name: str = "wide_resnet50_2"
    # the same rules as model.teacher.weights: a checkpoint path, s3:// / models:/ / runs:/ (with
    # sha256), "hub", or "random" (warns loudly)
    weights: str = "hub"
    sha256: str | None = None
    cache_dir: str | None = None
    stages: list[int] = [1, 2, 3]  # ResNet stages compared (layer1..layer3 [read, RD4AD])
    timm_kwargs: dict[str, Any] = {}  # architecture overrides, e.g. layers/channels for tiny tests

    @model_validator(mode="after")
    def _stages_are_consecutive(self) -> CNNTeacherConfig:
        s = self.stages
        if not s or s != list(range(s[0], s[0] + len(s))) or not 1 <= s[0] <= s[-1] <= 4:
            raise ValueError(f"model.snl.cnn_teacher.stages must be consecutive ResNet stages in 1..4, got {s}")
        check_weights_pin(self.weights, self.sha256, "model.snl.cnn_teacher")
        return self


class SNLConfig(_Section):
    """Structural distillation (SNL) [read: losses and CRAM; reconstructed: forms and weights, models/snl.py]."""

    # teacher of snl_rd / snl_fd: the paper's CNN (cnn_teacher) or the DINOv2 ViT (model.teacher);
    # dual_snl always uses model.teacher
    teacher: Literal["cnn", "vit"] = "cnn"
    cnn_teacher: CNNTeacherConfig = CNNTeacherConfig()
    cram: bool = True  # off switch: no CRAM modules at all
    num_centers: int = Field(8, ge=1)  # CRAM centres per student block
    cram_residual_weight: float = Field(1.0, ge=0.0)  # 0: CRAM is the identity
    temperature: float = Field(1.0, gt=0.0)  # spatial softmax temperature
    weight_channel: float = Field(1.0, ge=0.0)
    weight_spatial: float = Field(1.0, ge=0.0)
    weight_intra: float = Field(1.0, ge=0.0)
    weight_inter: float = Field(1.0, ge=0.0)
    map_intra_weight: float = Field(1.0, ge=0.0)  # test map: channel distance + this x intra-affinity distance

    @model_validator(mode="after")
    def _some_loss(self) -> SNLConfig:
        if not any((self.weight_channel, self.weight_spatial, self.weight_intra, self.weight_inter)):
            raise ValueError("model.snl.weight_channel/spatial/intra/inter are all 0: nothing would be trained")
        return self


Method = Literal["dual", "snl_rd", "snl_fd", "dual_snl"]
Branches = Literal["dual", "local", "semantic"]
# the branches each method may score with; the first is its default (model.branches: null)
METHOD_BRANCHES: dict[str, tuple[str, ...]] = {
    "dual": ("dual", "local", "semantic"),
    "dual_snl": ("dual", "local"),  # the structural losses act on the encoder-decoder branch
    "snl_rd": ("local",),
    "snl_fd": ("local",),
}


class ModelConfig(_Section):
    # dual: dual-student Noisy-OR; snl_rd / snl_fd: SNL on a reverse- or feature-distillation
    # student; dual_snl: SNL's structural losses and CRAM on the dual model's encoder-decoder branch
    method: Method = "dual"
    # which branch(es) score an image: both (Noisy-OR), or one alone (for ablations);
    # null (or absent): the method's own default (dual for dual / dual_snl, local for snl_*)
    branches: Branches = "dual"
    teacher: TeacherConfig = TeacherConfig()
    decoder: DecoderConfig = DecoderConfig()
    encoder: EncoderConfig = EncoderConfig()
    noisy_or: NoisyOrConfig = NoisyOrConfig()
    snl: SNLConfig = SNLConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_branches(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("branches") is None:
            allowed = METHOD_BRANCHES.get(data.get("method", "dual"))
            if allowed is not None:  # an unknown method is reported by the field itself
                data = {**data, "branches": allowed[0]}
        return data

    @model_validator(mode="after")
    def _encoder_view(self) -> ModelConfig:
        if self.encoder.image_size is not None and self.encoder.shared_blocks:
            raise ValueError(f"model.encoder.image_size={self.encoder.image_size} needs model.encoder.shared_blocks=0: "
                             f"S_E with shared_blocks={self.encoder.shared_blocks} reads the teacher's tokens, not an image")
        return self

    @model_validator(mode="after")
    def _method_fits_branches(self) -> ModelConfig:
        allowed = METHOD_BRANCHES[self.method]
        if self.branches not in allowed:
            raise ValueError(
                f"model.method={self.method} cannot score with model.branches={self.branches} "
                f"(allowed: {', '.join(allowed)}); remove model.branches (null) to use the method's own"
            )
        return self


class HardMiningConfig(_Section):
    enabled: bool = True
    final_fraction: float = Field(0.9, ge=0.0, lt=1.0)  # share of easiest points down-weighted
    ramp_steps: int = Field(1000, ge=0)
    factor: float = Field(0.1, ge=0.0, le=1.0)


class OptimizerConfig(_Section):
    """One optimiser recipe. The defaults are RD4AD's [read, its public code], which SNL's own students
    (snl_rd, snl_fd) train with: Adam, lr 0.005, betas (0.5, 0.999), no weight decay or clip, constant lr."""

    name: Literal["adam", "adamw"] = "adam"
    lr: float = Field(0.005, gt=0.0)
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = Field(0.0, ge=0.0)
    # constant: lr at every step (RD4AD); warmup_cosine: train.warmup_steps, then cosine down to
    # lr x train.min_lr / train.lr
    schedule: Literal["constant", "warmup_cosine"] = "constant"
    grad_clip: float | None = Field(None, ge=0.0)  # gradient-norm clip; None or 0: none (RD4AD)

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"Adam's betas are each in [0, 1), got {list(v)}")
        return v


class TrainConfig(_Section):
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    steps: int = Field(10000, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    min_lr: float = Field(2e-4, ge=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float | None = 0.1
    hard_mining: HardMiningConfig = HardMiningConfig()
    log_every: int = Field(10, ge=1)
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    cpu_amp: bool = False  # bf16 autocast on CPU (fast with AVX512-BF16/AMX, slow without)
    # snl_rd / snl_fd train with this optimiser; the other methods with Dinomaly's AdamW recipe above
    # (lr, min_lr, weight_decay, warmup_steps, grad_clip)
    snl_optimizer: OptimizerConfig = OptimizerConfig()

    def optimizer(self, recipe: Literal["dinomaly", "rd4ad"]) -> OptimizerConfig:
        """The optimiser settings of a model's recipe (models/interface.py, `optimizer_recipe`)."""
        if recipe == "rd4ad":
            return self.snl_optimizer
        return OptimizerConfig(name="adamw", lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay,
                               schedule="warmup_cosine", grad_clip=self.grad_clip)


class ScoringConfig(_Section):
    # the anomaly map's blur in pixels at the model's input size, or `dinomaly`: Dinomaly's effective
    # blur (its 5-tap, sigma-4 kernel on a 256 px map) scaled to the input size (scoring.map_sigma)
    gaussian_sigma: float | Literal["dinomaly"] = 4.0
    top_k_fraction: float = Field(0.01, gt=0.0, le=1.0)  # image score = mean of the top-k% map pixels
    # 1 - the false-alarm rate the threshold promises: the threshold is the conformal order statistic of
    # held-out normal probabilities (training/calibration.py)
    threshold_quantile: float = Field(0.99, gt=0.0, le=1.0)
    batch_size: int = Field(32, ge=1)
    # bf16 autocast when scoring on CPU: probabilities within 0.01 of fp32 on the demo data
    # (tests/models/test_speed_levers.py); fast with AVX512-BF16/AMX, slower than fp32 without
    cpu_amp: bool = False
    # openvino: on a CPU, serving and bulk scoring run the network as an OpenVINO graph (exported
    # once per model, checked against torch at load; pip install 'plantad[openvino]'); torch elsewhere
    runtime: Literal["torch", "openvino"] = "torch"
    # how the OpenVINO graph stores its weights: fp16 (OpenVINO's default when saving a graph), fp32, or int8
    # (NNCF post-training quantization of weights and activations, its ranges from the held-out normal images
    # the model ships, models/exported.py); an int8 graph whose probabilities on the other shipped images move
    # more than int8_tolerance from torch's is refused and the fp16 graph scores instead
    openvino_weights: Literal["fp16", "fp32", "int8"] = "fp16"
    int8_tolerance: float = Field(0.1, ge=0.0, le=1.0)  # measured: 0.079 on the trained tiny demo model
    # line-health drift reference fitted at calibration (evaluation/drift.py): held-out normal images kept
    # (their projected teacher embeddings and probabilities ship in the model's metadata) and projected dims
    drift_reference_images: int = Field(512, ge=8)
    drift_dims: int = Field(16, ge=2, le=256)
    drift_neighbours: int = Field(5, ge=1)  # k of the k-NN outlier score

    @field_validator("gaussian_sigma")
    @classmethod
    def _sigma_not_negative(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v < 0:
            raise ValueError(f"a blur sigma is 0 or more pixels (or 'dinomaly'), got {v}")
        return v


class EvaluateConfig(_Section):
    aupro_fpr_limit: float = Field(0.3, gt=0.0, le=1.0)
    max_pixels_per_image: int | None = None  # subsample pixel metrics for speed; None: all


class ValidationConfig(_Section):
    """Bounds for the Great Expectations suite over the manifest."""

    min_width: int = Field(32, ge=1)
    max_width: int = Field(8192, ge=1)
    min_height: int = Field(32, ge=1)
    max_height: int = Field(8192, ge=1)
    allowed_channels: list[int] = [1, 3, 4]
    min_train_normal_per_category: int = Field(10, ge=1)
    example_rows: int = Field(5, ge=1)  # rows quoted per failed expectation


class RayConfig(_Section):
    address: str | None = None  # None: RAY_ADDRESS if set, else a local cluster
    # node IP and dashboard host of a cluster plantad starts: 127.0.0.1 keeps every Ray port on loopback
    # (a one-node cluster); this node's IP opens it to other nodes (Ray then listens on all interfaces)
    host: str = "127.0.0.1"
    num_workers: int = Field(2, ge=1)
    # elastic training: after a lost worker or node, the run resumes from its newest checkpoint with as
    # many workers as fit (Ray Train's elastic ScalingConfig), at least this many; None: a fixed count,
    # the driver restarts the run once the live nodes have room for all num_workers (up to
    # stall_timeout_s; training/ray_restarts.py)
    min_workers: int | None = Field(None, ge=1)
    # elastic training: how long a worker group waits for its workers' resources before Ray Train
    # re-reads the cluster and starts the size that fits. After a lost node Ray Train first tries the
    # old size on its stale view of the cluster (the node is not yet declared dead), so this bounds
    # that try (Ray Train's own default: 60 s)
    elastic_placement_timeout_s: float = Field(10.0, gt=0.0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    storage_path: str = "runs/ray"  # local folder or s3://bucket/prefix
    max_failures: int = Field(2, ge=0)  # restarts from the newest checkpoint: Ray Train's (elastic) or the driver's (fixed)
    checkpoint_every_epochs: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)  # newest N kept in storage; their metrics form the run history
    steps_per_epoch: int = Field(20, ge=1)
    # read the training rows' image bytes from the shards once per run into Ray's object store
    # (spilled to disk when larger); false: every pass over the data lists and reads the shards again
    cache_images: bool = True
    data_cpus: float = Field(0.25, gt=0.0)  # CPUs each Ray Data task of a training run reserves (read, decode)
    # the floor when a training run fits its workers into what a shared cluster has free (the main
    # job's Serve replicas hold the rest): set it to cpus_per_worker to stop instead of shrinking
    min_cpus_per_worker: float = Field(0.25, gt=0.0)
    # true: the cluster adds nodes for pending work, so a job that does not fit waits for them (up to
    # stall_timeout_s) instead of stopping at once
    autoscaling: bool = False
    # a Ray job with no progress for this long fails, naming what it waited for (a fixed-count training
    # run's wait for room to restart included)
    stall_timeout_s: float = Field(300.0, gt=0.0)

    @field_validator("host")
    @classmethod
    def _node_ip(cls, value: str) -> str:
        if value.strip("[]") in ("0.0.0.0", "::", ""):
            raise ValueError(f"ray.host {value!r} is not an address a Ray node can have: use 127.0.0.1 (loopback "
                             "only) or this node's IP")
        return value

    @model_validator(mode="after")
    def _elastic_range(self) -> RayConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"ray.min_workers ({self.min_workers}) is above ray.num_workers ({self.num_workers})")
        return self

    def scaling_workers(self) -> int | tuple[int, int]:
        """Ray Train's ScalingConfig(num_workers): a fixed count, or (min, max) for elastic training."""
        return self.num_workers if self.min_workers is None else (self.min_workers, self.num_workers)


class MlflowConfig(_Section):
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI if set, else the embedded store
    ui_host: str = "127.0.0.1"  # bind address of mlflow/ui.sh; wider only with --app-name basic-auth
    experiment: str = "plantad"
    registered_model: str = "plantad-anomaly"
    promote: Literal["manual", "auto"] = "manual"
    promotion_metric: str = "image_auroc"
    # a model whose teacher has random weights never becomes champion automatically unless true
    allow_random_teacher_promotion: bool = False
    artifact_location: str | None = None  # e.g. s3://bucket/mlflow for a new experiment


class S3Config(_Section):
    endpoint_url: str | None = None  # None: AWS; set for MinIO, Ceph, moto ...
    bucket: str | None = None
    region: str = "us-east-1"


class AutoscalingConfig(_Section):
    """Ray Serve autoscaling bounds; when set, serve.num_replicas is ignored."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0.0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.autoscaling.min_replicas ({self.min_replicas}) is above max_replicas "
                             f"({self.max_replicas})")
        return self


class ReplicaResources(_Section):
    num_cpus: float = Field(1.0, ge=0.0)  # also the replica's decoding threads (rounded up, at least 1)
    num_gpus: float = Field(0.0, ge=0.0)
    # bytes Ray reserves for the replica: room for two versions during a swap (measured, see
    # docs/explanation/rollout.md "Memory"); a swap that would not fit is refused; None: no reservation
    memory: int | None = Field(2_147_483_648, ge=0)


class DriftConfig(_Section):
    """Online line health (serving/drift.py): each replica keeps a window per line and tests it against
    the served version's reference every `every_images` new images of that line."""

    enabled: bool = True
    window_images: int = Field(64, ge=8, le=4096)  # newest images per line kept for the test
    horizon_s: float = Field(3600.0, gt=0.0)  # images older than this leave the window
    min_images: int = Field(32, ge=2)  # no test while the window holds fewer (after images aged out)
    # test a line's window after this many new images of it; = window_images: tests see disjoint
    # windows, so on normal images their alarms are independent (the alert rule counts them)
    every_images: int = Field(64, ge=1)
    alpha: float = Field(0.01, gt=0.0, lt=1.0)  # level of the rank test: share of tests on normal images that alarm

    @model_validator(mode="after")
    def _fits(self) -> DriftConfig:
        if self.min_images > self.window_images:
            raise ValueError(f"serve.drift.min_images ({self.min_images}) is above serve.drift.window_images "
                             f"({self.window_images}): no test would ever run")
        return self


class CanaryConfig(_Section):
    """A canary: the lines it answers, and when the controller ends it on its own."""

    alias: str = "canary"  # the registry alias of the canary version (set it in the MLflow UI)
    lines: list[str] = []  # these lines are answered by the canary ...
    share: float = Field(0.0, ge=0.0, le=1.0)  # ... and this share of the others (sticky per line)
    margin: float = Field(0.05, ge=0.0, le=1.0)  # reject-rate (or error-rate) excess the canary may show
    min_images: int = Field(50, ge=1)  # canary images before the rollback test may act
    alpha: float = Field(0.01, gt=0.0, lt=1.0)  # one-sided two-proportion test level


class ShadowConfig(_Section):
    """A shadow version scores live images after the answer is sent, for comparison only."""

    alias: str = "challenger"
    share: float = Field(1.0, ge=0.0, le=1.0)  # of the lines (sticky per line)
    queue: int = Field(64, ge=1)  # images waiting per replica; beyond it they are dropped and counted
    report_every_s: float = Field(600.0, gt=0.0)  # comparison written to the shadow version this often


class RolloutConfig(_Section):
    """One controller per application decides which versions the replicas serve (serving/rollout.py)."""

    last_known_good_alias: str = "last-known-good"  # set by the controller once every replica serves a champion
    follow_s: float = Field(0.5, gt=0.0)  # how often each replica asks the controller what to serve
    keep_previous_s: float = Field(600.0, ge=0.0)  # the previous champion stays loaded this long after a move
    declared_bound_s: float = Field(120.0, gt=0.0)  # /readyz fails when a replica lags the declared version longer
    golden_atol: float = Field(0.01, gt=0.0, le=1.0)  # |probability difference| allowed against recorded outputs
    shadow: ShadowConfig | None = None  # None: no shadow scoring
    canary: CanaryConfig | None = None  # None: no canary


class RecordsConfig(_Section):
    """A record per scored part (serving/records.py), appended in Parquet parts to `serve.store`.
    Off by default: images and part ids of a line are the plant's data, kept only when asked."""

    enabled: bool = False
    flush_s: float = Field(2.0, gt=0.0)  # a replica writes its pending rows at least this often
    part_rows: int = Field(512, ge=1)  # rows per Parquet part at most
    buffer_rows: int = Field(10000, ge=1)  # rows waiting per replica; beyond: dropped and counted, never blocking
    images: bool = True  # keep the images of REVIEW and NG parts (the review queue)
    ok_image_share: float = Field(0.0, ge=0.0, le=1.0)  # and this sampled share of OK parts' images
    images_max_bytes: int = Field(2_000_000_000, ge=0)  # image store cap, counted per replica from its start


class ServeConfig(_Section):
    """The Ray Serve scoring application (`plantad serve`, deploy/serve_config.yaml's args)."""

    host: str = "127.0.0.1"  # HTTP bind address; 0.0.0.0 only behind an API key or a firewall
    port: int = Field(8000, ge=1, le=65535)
    # each replica also answers HTTP on a port of its own (Ray Serve direct ingress, clusters plantad starts)
    direct_ingress: bool = False
    route_prefix: str = "/"
    app_name: str = "plantad"
    model_name: str = "plantad-anomaly"  # serves models:/<model_name>@<model_alias>
    model_alias: str = "champion"
    model_dir: str | None = None  # a model folder instead of the registry (no promotion following)
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI where the app is built
    device: str = "auto"  # auto | cpu | cuda
    # scoring network on a CPU replica; None: the version's own scoring.runtime (what it was trained with)
    runtime: Literal["torch", "openvino"] | None = None
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    ray_actor_options: ReplicaResources = ReplicaResources()
    max_ongoing_requests: int = Field(32, ge=1)  # per replica
    max_queued_requests: int = Field(64, ge=-1)  # per caller; beyond it: 503 (-1: unbounded, not advised)
    max_batch_size: int = Field(16, ge=1)  # requests per @serve.batch call
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    # a request that finds no other queued or scoring on its replica is scored at once, without the batch window
    idle_skips_batch_wait: bool = True
    max_concurrent_batches: int = Field(1, ge=1)  # batches a replica scores at once (overlaps decoding and answers)
    alias_poll_s: float = Field(1.0, gt=0.0)  # the rollout controller's registry poll (one per application)
    max_image_bytes: int = Field(20_000_000, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(64, ge=1)
    max_request_bytes: int = Field(100_000_000, ge=1)  # whole body (base64 JSON is 4/3 of the image bytes)
    # decoded pixels of all images of one request (each image's header is read before it is decoded)
    max_request_pixels: int = Field(64_000_000, ge=1)
    max_heatmap_side: int = Field(1024, ge=16)  # heatmap PNGs are rendered at most this many pixels wide and high
    request_timeout_s: float | None = Field(60.0, gt=0.0)  # Serve's HTTP deadline for a request; None: none
    max_lines: int = Field(256, ge=1)  # distinct `line` labels a replica's metrics keep; later new ones: "other"
    api_keys_env: str = "PLANTAD_API_KEYS"  # comma-separated keys in this variable of the replicas
    api_keys_file: str | None = None  # or one key per line in this file (never keys in params.yaml)
    # a host other than loopback without any API key refuses to start unless this is true
    allow_unauthenticated: bool = False
    webhook_secret_env: str = "PLANTAD_WEBHOOK_SECRET"  # MLflow webhook HMAC secret; unset: route off
    webhook_secret_file: str | None = None  # or the secret in this file
    golden_image: str | None = None  # self-test image for a new version; None: the packaged one
    rollout: RolloutConfig = RolloutConfig()
    # each node fetches a version once, for all its replicas; None: plantad-models in the node's temp folder
    model_cache_dir: str | None = None
    model_cache_keep: int = Field(4, ge=1)  # most recently used versions per model kept in that cache
    drift: DriftConfig = DriftConfig()  # line health: drift of each line's images from the version's reference
    # the line's window (docs/how-to/inspection.md): bands, audit log, records and reviews live here,
    # a folder or s3://bucket/prefix shared by all replicas; None: bands fixed at the calibrated threshold
    store: str | None = None
    store_s3: S3Config = S3Config()  # endpoint of an s3:// store (MinIO, Ceph, ...)
    bands_poll_s: float = Field(2.0, gt=0.0)  # how often each replica reads new band changes from the store
    records: RecordsConfig = RecordsConfig()
    recent_traffic: int = Field(0, ge=0)  # last N scored images a replica keeps for the page; 0: off (privacy)
    line_categories: dict[str, str] = {}  # line -> dataset category (review export); non-empty: the only lines
    mlflow_ui_url: str | None = None  # the page links a version's run there (e.g. http://mlflow:5000)

    @model_validator(mode="after")
    def _batch_fits(self) -> ServeConfig:
        if self.max_batch_size * self.max_concurrent_batches > self.max_ongoing_requests:
            raise ValueError(f"serve.max_batch_size ({self.max_batch_size}) x serve.max_concurrent_batches "
                             f"({self.max_concurrent_batches}) is above serve.max_ongoing_requests "
                             f"({self.max_ongoing_requests}): batches could never fill")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"serve.route_prefix must start with '/', got {self.route_prefix!r}")
        if self.max_image_pixels > self.max_request_pixels:
            raise ValueError(f"serve.max_image_pixels ({self.max_image_pixels}) is above serve.max_request_pixels "
                             f"({self.max_request_pixels}): an image within its own limit could never be scored")
        return self

    @property
    def model_uri(self) -> str:
        return self.model_dir or f"models:/{self.model_name}@{self.model_alias}"


class BulkStageConfig(_Section):
    """The DVC stage `score`: off by default, so `dvc repro` only writes a "disabled" record."""

    enabled: bool = False
    input: str = "data/demo"  # folder (a DVC dep) to score with `model`
    output: str = "outputs/scores"  # folder or s3://bucket/prefix; a sub-folder per model version
    model: str = "models:/plantad-anomaly@champion"
    maps: str | None = None  # folder or s3:// prefix for heatmap PNGs; None: no maps


class BulkConfig(_Section):
    """Bulk scoring (`plantad score`): Ray Data over an actor pool that holds one model version."""

    extensions: list[str] = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"]  # matched case-insensitively
    part_size: int = Field(256, ge=1)  # images per committed Parquet part (the unit of resume)
    batch_size: int = Field(32, ge=1)  # images per map_batches call
    actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0.0)  # also the actor's torch threads (rounded, at least 1)
    min_cpus_per_actor: float = Field(0.25, gt=0.0)  # floor when fitting into a shared cluster's free CPUs
    gpus_per_actor: float = Field(0.0, ge=0.0)
    read_cpus: float = Field(0.25, gt=0.0)  # CPUs reserved by each Ray Data reading task
    device: str = "auto"  # auto | cpu | cuda (bf16 autocast: CUDA with the model's train.amp, CPU with scoring.cpu_amp)
    runtime: Literal["torch", "openvino"] | None = None  # on CPU actors; None: the version's scoring.runtime
    max_image_bytes: int = Field(50_000_000, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)  # checked on the header before decoding
    # a run's lock on its output is stale (taken over) after this long without a heartbeat (every 1/4 of it)
    lock_stale_s: float = Field(300.0, ge=4.0)
    stage: BulkStageConfig = BulkStageConfig()


class Settings(_Section):
    data: DataConfig = DataConfig()
    demo: DemoConfig = DemoConfig()
    semantic_demo: SemanticDemoConfig = SemanticDemoConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scoring: ScoringConfig = ScoringConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    validation: ValidationConfig = ValidationConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    s3: S3Config = S3Config()
    serve: ServeConfig = ServeConfig()
    bulk: BulkConfig = BulkConfig()


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid settings in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}' (check the spelling against params.yaml)")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value), the value parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def settings_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


class _ServeOnly(_Section):
    serve: ServeConfig


def serve_config_from_dict(raw: dict[str, Any], source: str) -> ServeConfig:
    """The `serve` section alone (Ray Serve's app args); errors name the key as serve.<key>."""
    try:
        return _ServeOnly.model_validate({"serve": raw}).serve
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_settings(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Settings:
    """Read params.yaml (or defaults when `path` is None) and apply `--set key=value` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"params file {p} not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"params file {p} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"params file {p} must hold a mapping at the top level")
        source = str(p)
    raw = apply_overrides(raw, list(overrides or []))
    return settings_from_dict(raw, source)


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    return settings.model_dump(mode="json")
