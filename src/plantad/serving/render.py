"""What a person looks at: the anomaly map as a heat overlay on the image, and the box around the
most anomalous region, both in the original image's pixel coordinates.

The heat is the map on the Noisy-OR local scale, 1 - exp(-lambda_D * map): 0.5 is where a whole
image would sit at the 99th percentile of held-out normal images, so colours mean the same across
images and model versions.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def pixel_probability(amap: np.ndarray, lambda_local: float) -> np.ndarray:
    """(S, S) map -> (S, S) values in [0, 1] on the local branch's calibrated scale."""
    return 1.0 - np.exp(-max(lambda_local, 0.0) * np.clip(amap, 0.0, None))


def _resize(values: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def bounded_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, so that neither passes `max_side` (None: as is)."""
    scale = 1.0 if max_side is None else min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def heatmap_overlay_png(image: Image.Image, amap: np.ndarray, lambda_local: float, alpha: float = 0.5,
                        max_side: int | None = None) -> bytes:
    """PNG of `image` (RGB) blended with the calibrated heat in matplotlib's 'jet', at the image's
    size or scaled down to at most `max_side` pixels a side (at full size, the blend's three float32
    RGB arrays of a 40-megapixel image take 1.4 GB of the replica's memory)."""
    from matplotlib import colormaps

    size = bounded_size(*image.size, max_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    heat = _resize(pixel_probability(amap, lambda_local), *image.size)
    colours = (colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0).astype(np.float32)
    blend = (1.0 - alpha) * np.asarray(image.convert("RGB"), dtype=np.float32) + alpha * colours
    buf = io.BytesIO()
    Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def anomaly_box(amap: np.ndarray, width: int, height: int) -> dict[str, int | float]:
    """Box [x0, y0, x1) x [y0, y1) in original pixels around the connected region holding the map's
    peak: the pixels above halfway between the map's median and its peak."""
    from scipy import ndimage

    s_h, s_w = amap.shape
    peak_at = np.unravel_index(int(np.argmax(amap)), amap.shape)
    peak, median = float(amap[peak_at]), float(np.median(amap))
    labels, _ = ndimage.label(amap >= median + 0.5 * (peak - median))
    ys, xs = np.nonzero(labels == labels[peak_at])
    sx, sy = width / s_w, height / s_h
    return {
        "x0": int(np.floor(xs.min() * sx)), "y0": int(np.floor(ys.min() * sy)),
        "x1": int(np.ceil((xs.max() + 1) * sx)), "y1": int(np.ceil((ys.max() + 1) * sy)),
        "peak_x": int((peak_at[1] + 0.5) * sx), "peak_y": int((peak_at[0] + 0.5) * sy), "peak_score": peak,
    }
