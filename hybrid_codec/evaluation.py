"""Measuring the codec on images: quality, size and timings of a round trip, and a picture of it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .codec import Codec
from .images import image_to_tensor, open_image
from .metrics import ms_ssim, psnr


def bits_per_pixel(size_bytes: int, height: int, width: int) -> float:
    return size_bytes * 8 / (height * width)


@dataclass
class RoundTrip:
    original: Image.Image
    decoded: Image.Image
    psnr: float
    ms_ssim: float
    bpp: float
    latent_bytes: int
    encode_ms: float
    decode_ms: float
    level: int | None = None


def roundtrip(codec: Codec, source: Path, quality: int | None = None) -> RoundTrip:
    """Encode to file bytes and decode them, in memory; quality, size and timings of what a file would hold."""
    original = open_image(source, codec.max_pixels)
    begin = time.perf_counter()
    latent = codec.encode(original, quality)
    data = codec.to_bytes(latent)
    middle = time.perf_counter()
    decoded = codec.decode(data)
    end = time.perf_counter()
    size = len(data)
    a, b = image_to_tensor(original, codec.max_pixels), image_to_tensor(decoded, codec.max_pixels)
    return RoundTrip(
        original=original,
        decoded=decoded,
        psnr=psnr(a, b),
        ms_ssim=ms_ssim(a, b) if min(original.size) >= 16 else float("nan"),
        bpp=bits_per_pixel(size, original.height, original.width),
        latent_bytes=size,
        encode_ms=(middle - begin) * 1000,
        decode_ms=(end - middle) * 1000,
        level=latent.level,
    )


def comparison(original: Image.Image, decoded: Image.Image, caption: str = "") -> Image.Image:
    """Original and decoded side by side, labelled, on one canvas."""
    gap, band = 8, 20
    w, h = original.size
    canvas = Image.new("RGB", (2 * w + gap, h + band), "white")
    canvas.paste(original, (0, band))
    canvas.paste(decoded, (w + gap, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "original", fill="black")
    draw.text((w + gap + 4, 4), f"decoded {caption}".strip(), fill="black")
    return canvas
