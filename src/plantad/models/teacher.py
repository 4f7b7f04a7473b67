"""Frozen DINOv2 teacher (any timm ViT) that exposes mid-layer patch tokens and the class token.

Weights come from exactly one explicit source: a local checkpoint (timm `.safetensors` or Meta's
original `.pth`, converted by timm's checkpoint filter, which also resamples `pos_embed`), `hub`
(timm pretrained, needs network) or `random` (only when asked for, with a loud warning).
A checkpoint must match its sha256 pin (the `sha256` setting, else `<file>.sha256` beside it) and
is read by plantad itself (safetensors, or `torch.load(weights_only=True)`) before timm converts
it. Remote checkpoints (s3://, models:/, runs:/) are fetched into a verified local file by the caller
before the model is built (tracking/teacher_weights.py); the identity then records the remote URI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from torch import nn

from plantad.config import REMOTE_WEIGHTS, TeacherConfig
from plantad.models.class_token import class_token_block, supports_class_token_only
from plantad.models.safe_load import (
    SHA256_SUFFIX,
    UnverifiedFileError,
    load_weights,
    sidecar_sha256,
    verify_sha256,
)

log = logging.getLogger(__name__)

def random_weights_warning(key: str = "model.teacher.weights", pretrained: str = "DINOv2") -> str:
    return (
        f"TEACHER HAS RANDOM WEIGHTS: {key}=random was selected explicitly. Scores are "
        f"not those of a pretrained {pretrained}; use a local checkpoint path or 'hub' in production."
    )


RANDOM_WEIGHTS_WARNING = random_weights_warning()


class TeacherLoadError(RuntimeError):
    """The configured teacher checkpoint is missing, unreadable or does not fit the architecture."""


class TeacherFeatures(NamedTuple):
    layers: list[torch.Tensor]  # per configured layer: raw block output, patch tokens (B, N, C)
    prefix: list[torch.Tensor]  # per configured layer: class/register tokens (B, P, C)
    cls: torch.Tensor | None  # final normalised class token (B, C); None when the teacher stops early
    patch_mean: torch.Tensor | None  # mean of the final normalised patch tokens (B, C); None likewise
    shared: torch.Tensor | None = None  # all tokens after block `share_blocks - 1` (B, P+N, C): S_E's input


@dataclass(frozen=True)
class TeacherIdentity:
    """What a saved model records so that anyone can tell which teacher produced its scores."""

    name: str
    weights: str  # "hub", "random" or the checkpoint path as configured
    source: str  # "hub" | "random" | "checkpoint"
    sha256: str | None  # of the checkpoint file, when one was used
    timm_kwargs: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": self.weights,
            "source": self.source,
            "sha256": self.sha256,
            "timm_kwargs": dict(self.timm_kwargs),
            "warning": RANDOM_WEIGHTS_WARNING if self.source == "random" else None,
        }


def _create(name: str, timm_kwargs: dict[str, Any], create_kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    return timm.create_model(name, **create_kwargs, **timm_kwargs, **extra)


def build_timm_teacher(
    name: str,
    weights: str,
    timm_kwargs: dict[str, Any],
    create_kwargs: dict[str, Any],
    load_weights: bool = True,
    key: str = "model.teacher.weights",
    sha256: str | None = None,
) -> tuple[nn.Module, TeacherIdentity]:
    """Create a timm model and load `weights` by the one rule every teacher follows: a local
    checkpoint (checked against `sha256`, else its `.sha256` sidecar), `hub`, or `random` (explicit,
    warns loudly). `load_weights=False` gives the bare architecture, used when a saved plantad
    model brings its own teacher weights; `key` is the setting named in errors."""
    if not load_weights or weights == "random":
        net = _create(name, timm_kwargs, create_kwargs, pretrained=False)
        if load_weights:
            log.warning(random_weights_warning(key, "DINOv2" if key == "model.teacher.weights" else name))
        return net, TeacherIdentity(name, weights, "random" if weights == "random" else _source(weights), None, timm_kwargs)
    if weights.startswith(REMOTE_WEIGHTS):
        raise TeacherLoadError(
            f"{key}={weights} is remote: the models read local files only, so the caller fetches it into a "
            "verified local file before building the model (training, serving and bulk scoring do; in your own "
            "code use plantad.tracking.teacher_weights.build_model_with_teacher_weights)"
        )
    if weights == "hub":
        try:
            net = _create(name, timm_kwargs, create_kwargs, pretrained=True)
        except Exception as exc:  # network, hub or auth errors from timm/huggingface_hub
            raise TeacherLoadError(
                f"could not download pretrained weights for teacher '{name}' from the hub ({exc}). "
                f"Offline machines must set {key} to a local checkpoint path, or to an s3:// or models:/ URI "
                "with its sha256 (`plantad teacher publish`)."
            ) from exc
        return net, TeacherIdentity(name, weights, "hub", None, timm_kwargs)
    return _load_checkpoint(name, timm_kwargs, create_kwargs, Path(weights), key, sha256)


def build_vit(cfg: TeacherConfig, image_size: int, load_weights: bool = True) -> tuple[nn.Module, TeacherIdentity]:
    """The timm ViT of model.teacher with its configured weights."""
    return build_timm_teacher(cfg.name, cfg.weights, cfg.timm_kwargs, {"img_size": image_size, "num_classes": 0},
                              load_weights, sha256=cfg.sha256)


def _source(weights: str) -> str:
    return weights if weights in ("hub", "random") else "checkpoint"


def _load_checkpoint(
    name: str, timm_kwargs: dict[str, Any], create_kwargs: dict[str, Any], path: Path, key: str, pin: str | None
) -> tuple[nn.Module, TeacherIdentity]:
    if not path.is_file():
        raise TeacherLoadError(
            f"teacher checkpoint {path} does not exist ({key}). Give the path of a timm "
            "'.safetensors' (or Meta DINOv2 '.pth') file, 'hub' when online, or 'random' for tests."
        )
    digest, state = _verified_state_dict(path, pin, key.removesuffix(".weights") + ".sha256")
    try:  # timm's checkpoint filter converts Meta's layout and resamples pos_embed
        net = _create(name, timm_kwargs, create_kwargs, pretrained=True, pretrained_cfg_overlay={"state_dict": state})
    except RuntimeError as exc:  # load_state_dict lists missing/unexpected/mismatched keys
        raise TeacherLoadError(
            f"teacher checkpoint {path} does not fit architecture '{name}' "
            f"(timm_kwargs={timm_kwargs}):\n{exc}"
        ) from exc
    except Exception as exc:  # timm's filter failing on a state dict that is not a ViT's
        raise TeacherLoadError(f"teacher checkpoint {path} could not be converted for '{name}': {exc}") from exc
    return net, TeacherIdentity(name, str(path), "checkpoint", digest, timm_kwargs)


def _verified_state_dict(path: Path, pin: str | None, pin_key: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(sha256, state dict) of a teacher checkpoint whose hash matches `pin` (the setting
    `pin_key`), else the hash recorded in `<file>.sha256`."""
    sidecar = path.with_name(path.name + SHA256_SUFFIX)
    expected, recorded_in = (pin, pin_key) if pin else (sidecar_sha256(path), str(sidecar))
    if expected is None:
        raise TeacherLoadError(
            f"teacher checkpoint {path} has no recorded sha256: set {pin_key}, or put {sidecar} beside it. "
            f"Check the file against its publisher's hash, then record it: `sha256sum {path.name} > {sidecar.name}`"
        )
    try:
        digest = verify_sha256(path, expected, recorded_in)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            blob: Any = load_file(str(path), device="cpu")
        else:
            blob = load_weights(path)
    except UnverifiedFileError as exc:
        raise TeacherLoadError(str(exc)) from exc
    except Exception as exc:  # truncated files, foreign formats: safetensors' and torch's own errors
        raise TeacherLoadError(f"teacher checkpoint {path} could not be read: {exc}") from exc
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict):
        raise TeacherLoadError(f"teacher checkpoint {path} holds a {type(blob).__name__}, not a state dict")
    return digest, {k.removeprefix("module."): v for k, v in blob.items()}


class Teacher(nn.Module):
    """Frozen ViT run once per batch for every branch: the configured layers' raw tokens, the final
    class token (only with `final`; without it the teacher stops at the deepest block anything
    needs) and, with `share_blocks` k > 0, all tokens after block k-1 for an S_E that shares them.
    Without `patch_mean` nothing reads the final patch tokens, so the last block runs for the class
    token alone (models/class_token.py)."""

    def __init__(
        self, cfg: TeacherConfig, image_size: int, load_weights: bool = True, final: bool = True,
        share_blocks: int = 0, patch_mean: bool = True,
    ) -> None:
        super().__init__()
        self.vit, self.identity = build_vit(cfg, image_size, load_weights)
        depth = len(self.vit.blocks)
        bad = [i for i in cfg.layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"model.teacher.layers {bad} outside the teacher's {depth} blocks")
        if not 0 <= share_blocks < depth:
            raise ValueError(f"model.encoder.shared_blocks={share_blocks} must be below the teacher's depth "
                             f"({depth} blocks): S_E needs at least one block of its own")
        self.layers = list(cfg.layers)
        self.final = final
        self.share_blocks = share_blocks
        self.embed_dim: int = self.vit.embed_dim
        self.num_heads: int = self.vit.blocks[0].attn.num_heads
        self.num_prefix_tokens: int = self.vit.num_prefix_tokens
        self.grid: tuple[int, int] = tuple(self.vit.patch_embed.grid_size)
        self.patch_size: int = int(self.vit.patch_embed.patch_size[0])
        # blocks whose outputs are read, in block order (forward_intermediates returns them so)
        self._taps = sorted(set(self.layers) | ({share_blocks - 1} if share_blocks else set()))
        # the class token alone from the last block: nothing taps that block and nothing reads its patches
        self.class_token_only = (final and not patch_mean and self._taps[-1] < depth - 1
                                 and supports_class_token_only(self.vit.blocks[-1]))
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.vit.eval()

    @property
    def blocks_run(self) -> int:
        """How many blocks one forward runs: all of them when the final output is needed."""
        return len(self.vit.blocks) if self.final else self._taps[-1] + 1

    def train(self, mode: bool = True) -> Teacher:
        """The teacher stays in eval mode whatever its parent does."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> TeacherFeatures:
        kw = dict(indices=self._taps, return_prefix_tokens=True, norm=False, output_fmt="NLC")
        depth = len(self.vit.blocks)
        cls = None
        final = None
        if self.class_token_only:  # every block but the last, then the last for the class token
            indices = sorted(set(self._taps) | {depth - 2})
            taps = dict(zip(indices, self.vit.forward_intermediates(x, stop_early=True, intermediates_only=True,
                                                                    **{**kw, "indices": indices})))
            patch, pre = taps[depth - 2]
            cls = self.vit.norm(class_token_block(self.vit.blocks[-1], torch.cat([pre, patch], dim=1)))[:, 0]
        elif self.final:
            final, inter = self.vit.forward_intermediates(x, **kw)
            taps = dict(zip(self._taps, inter))
        else:  # nothing needs the last blocks or the final norm
            taps = dict(zip(self._taps, self.vit.forward_intermediates(x, stop_early=True, intermediates_only=True,
                                                                       **kw)))
        # taps: block index -> (patch tokens, prefix tokens)
        patches = [taps[i][0] for i in self.layers]
        prefix = [taps[i][1] for i in self.layers]
        shared = None
        if self.share_blocks:
            patch, pre = taps[self.share_blocks - 1]
            shared = torch.cat([pre, patch], dim=1)
        if final is None:
            return TeacherFeatures(patches, prefix, cls, None, shared)
        final_patch = final[:, self.num_prefix_tokens :]
        return TeacherFeatures(patches, prefix, final[:, 0], final_patch.mean(dim=1), shared)
