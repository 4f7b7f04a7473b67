"""A seeded corpus of hostile image uploads for the scoring service.

Each case is (name, bytes, expected status): 400 for what cannot be decoded, 413 for what is over
a limit. Byte mutations of valid PNG/JPEG files are kept only when Pillow itself fails to decode
them (checked here with Pillow directly), so every case is malformed.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

MAX_IMAGE_BYTES = 200_000  # the test app's serve.max_image_bytes
MAX_IMAGE_PIXELS = 1_000_000  # and serve.max_image_pixels


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def pillow_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not an image" for the oracle
        return False


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with a tiny compressed body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (width + 1) * 64, 9)  # the first 64 rows; the decoder never gets here
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    kind = rng.integers(0, 3)
    if kind == 0:  # flip a few bytes
        for pos in rng.integers(0, len(b), size=int(rng.integers(1, 8))):
            b[pos] ^= int(rng.integers(1, 256))
    elif kind == 1:  # cut a slice out
        start = int(rng.integers(0, len(b) - 1))
        del b[start:start + int(rng.integers(1, 64))]
    else:  # overwrite a run with random bytes
        start = int(rng.integers(0, len(b) - 16))
        b[start:start + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    return bytes(b)


def malformed_cases(seed: int = 0, n_mutations: int = 150) -> list[tuple[str, bytes, int]]:
    rng = np.random.default_rng(seed)
    photo = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    png, jpeg = encode(photo, "PNG"), encode(photo, "JPEG", quality=90)
    cases: list[tuple[str, bytes, int]] = []
    texts = [b"hello", b"<html><body>not an image</body></html>", b'{"image": 1}', b"GIF89a", b"\x89PNG\r\n",
             b"\xff\xd8\xff", b"PK\x03\x04" + b"\x00" * 40, b"BM" + b"\x00" * 10, b"%PDF-1.4\n", b"\x00" * 100]
    cases += [(f"not-an-image-{i}.png", t, 400) for i, t in enumerate(texts)]
    cases += [(f"random-{i}.bin", rng.integers(0, 256, int(rng.integers(1, 4000)), dtype=np.uint8).tobytes(), 400)
              for i in range(10)]
    for i, frac in enumerate(np.linspace(0.05, 0.95, 10)):
        cases.append((f"truncated-{i}.png", png[:int(len(png) * frac)], 400))
        cases.append((f"truncated-{i}.jpg", jpeg[:int(len(jpeg) * frac)], 400))
    cases += [(f"bomb-{w}x{h}.png", png_bomb(w, h), 413) for w, h in
              [(30000, 30000), (100000, 100000), (65535, 20), (20, 65535), (1001, 1000)]]
    noise = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)  # about 270 kB as PNG: over the byte limit
    cases += [(f"too-many-bytes-{i}.png", encode(np.roll(noise, i, axis=0), "PNG"), 413) for i in range(3)]
    flat = np.zeros((1000, 1001), np.uint8)  # a few kB, but over the pixel limit
    cases += [("too-many-pixels.png", encode(flat, "PNG"), 413), ("too-many-pixels.jpg", encode(flat, "JPEG"), 413),
              ("too-many-pixels.gif", encode(flat, "GIF"), 413)]
    cases += [(f"empty-{i}.png", b"", 400) for i in range(3)]
    mutated = 0
    while mutated < n_mutations:
        source, ext = (png, "png") if mutated % 2 == 0 else (jpeg, "jpg")
        data = mutate(source, rng)
        if not pillow_decodes(data):
            cases.append((f"mutated-{mutated}.{ext}", data, 400))
            mutated += 1
    return cases


def converted_cases() -> list[tuple[str, bytes, str]]:
    """Valid images that must be scored after conversion, with the `converted` text the answer gives."""
    grey = np.tile(np.arange(40, dtype=np.uint8) * 6, (40, 1))
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 200)])
    pal = Image.fromarray(np.dstack([grey] * 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    return [("grey.png", encode(grey, "PNG"), "converted from L to RGB"),
            ("grey16.png", encode(grey.astype(np.uint16) * 257, "PNG"), "converted from I;16 to RGB"),
            ("rgba.png", encode(rgba, "PNG"), "converted from RGBA to RGB"),
            ("palette.png", buf.getvalue(), "converted from P to RGB")]
