"""Weight files are checked before they are read: the bytes must match the sha256 recorded beside
them, and `torch.load` runs with `weights_only=True`, which refuses pickled code instead of running it.

The hash catches a corrupted, truncated or swapped file; whoever can rewrite both the file and its
recorded hash still meets `weights_only=True`, so a pickle that would run code is never executed.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

SHA256_SUFFIX = ".sha256"


class UnverifiedFileError(RuntimeError):
    """A weight file whose bytes do not match its recorded sha256, or that holds more than tensors."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str | None, recorded_in: str) -> str:
    """The file's sha256 when it equals `expected` (recorded in `recorded_in`); else the error."""
    if not expected:
        raise UnverifiedFileError(f"refusing to load {path}: no sha256 recorded for it in {recorded_in}")
    actual = file_sha256(path)
    if actual != expected.strip().lower():
        raise UnverifiedFileError(f"refusing to load {path}: its sha256 is {actual} but {recorded_in} records "
                                  f"{expected.strip()}; the file was changed or corrupted after it was written")
    return actual


def sidecar_sha256(path: Path) -> str | None:
    """The hash in `<file>.sha256` beside `path` (`sha256sum` format: the first word), if present."""
    sidecar = path.with_name(path.name + SHA256_SUFFIX)
    if not sidecar.is_file():
        return None
    words = sidecar.read_text().split()
    return words[0] if words else None


def load_weights(path: Path) -> Any:
    """`torch.load(weights_only=True)` on CPU; pickled objects other than tensors and plain
    containers are refused (and never run) with an error naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = _unpickler_reason(str(exc))
        if "GLOBAL" in why:
            raise UnverifiedFileError(f"refusing to load {path}: it holds pickled objects that are not plain "
                                      f"weights, and these are never executed ({why})") from exc
        raise UnverifiedFileError(f"{path} is not a readable weights file ({why})") from exc


def _unpickler_reason(message: str) -> str:
    """torch's weights_only error without its boilerplate (which suggests weights_only=False)."""
    skip = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return " ".join(lines).removeprefix("WeightsUnpickler error:").strip() or "unreadable pickle"
