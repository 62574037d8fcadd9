"""Rate-distortion on a folder: every quality level of a model beside Pillow's JPEG, WebP and AVIF.

bpp is what a file on disk holds (bytes x 8 / pixels), PSNR is on 8-bit RGB, and the times are
one call each of the file-level encode and decode. BD-rate and BD-PSNR (Bjontegaard deltas, the
`bjontegaard` package) compare the model's curve with each classic codec's over the range where
both have points.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .codec import Codec
from .errors import CodecError
from .images import find_images, image_to_tensor, open_image
from .metrics import ms_ssim, psnr
from .paths import write_atomic

# Pillow quality settings swept per classic codec: from their smallest files up past the model's highest level
CLASSIC = {
    "JPEG": ("JPEG", (2, 3, 5, 8, 10, 15, 20, 30)),
    "WebP": ("WEBP", (0, 2, 5, 10, 20, 40)),
    "AVIF": ("AVIF", (0, 10, 20, 30, 45, 60)),
}


@dataclass
class Point:
    """One image through one codec at one setting."""

    codec: str
    setting: int  # the quality level, or Pillow's quality
    image: str
    bpp: float
    psnr: float
    ms_ssim: float
    encode_ms: float
    decode_ms: float


@dataclass
class Mean:
    """A codec at one setting, averaged over the images."""

    codec: str
    setting: int
    bpp: float
    psnr: float
    ms_ssim: float
    encode_ms: float  # medians over the images: the first call pays for warming up
    decode_ms: float


@dataclass
class Delta:
    """The model against one classic codec: negative BD-rate is fewer bits for the same PSNR."""

    anchor: str
    bd_rate: float  # percent
    bd_psnr: float  # dB
    bd_ms_ssim: float


def _timed(job):
    begin = time.perf_counter()
    out = job()
    return out, (time.perf_counter() - begin) * 1000


def classic_roundtrip(image: Image.Image, fmt: str, quality: int) -> tuple[bytes, Image.Image, float, float]:
    """A Pillow file of `image` and its decoding: (bytes, decoded, encode ms, decode ms)."""

    def encode() -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, quality=quality)
        return buffer.getvalue()

    def decode(data: bytes) -> Image.Image:
        with Image.open(io.BytesIO(data)) as decoded:
            return decoded.convert("RGB")

    data, encode_ms = _timed(encode)
    decoded, decode_ms = _timed(lambda: decode(data))
    return data, decoded, encode_ms, decode_ms


def hybrid_roundtrip(codec: Codec, image: Image.Image, level: int | None) -> tuple[bytes, Image.Image, float, float]:
    """The model's file of `image` at `level` and its decoding: (bytes, decoded, encode ms, decode ms)."""
    data, encode_ms = _timed(lambda: codec.compress(image, level))
    decoded, decode_ms = _timed(lambda: codec.decompress(data))
    return data, decoded, encode_ms, decode_ms


def jobs(codec: Codec, classics: tuple[str, ...]) -> list[tuple[str, int, Callable]]:
    """(codec name, setting, image -> (bytes, decoded, encode ms, decode ms)) for every setting evaluated."""
    levels: list[int | None] = list(range(1, codec.quality_levels + 1)) or [None]
    out = [
        (codec.name, level or 0, lambda image, level=level: hybrid_roundtrip(codec, image, level)) for level in levels
    ]
    for name in classics:
        if name not in CLASSIC:
            raise CodecError(f"unknown classic codec {name!r}; expected some of {', '.join(CLASSIC)}")
        fmt, qualities = CLASSIC[name]
        out += [(name, q, lambda image, fmt=fmt, q=q: classic_roundtrip(image, fmt, q)) for q in qualities]
    return out


def evaluate(
    folder: Path,
    codec: Codec,
    classics: tuple[str, ...] = tuple(CLASSIC),
    advance: Callable[[], None] = lambda: None,
) -> list[Point]:
    """Every image of `folder` through every setting; `advance` is called after each image."""
    paths = find_images(folder)
    if not paths:
        raise CodecError(f"{folder}: holds no images")
    settings = jobs(codec, classics)
    points = []
    for path in paths:
        image = open_image(path)
        original = image_to_tensor(image)
        pixels = image.width * image.height
        for name, setting, run in settings:
            data, decoded, encode_ms, decode_ms = run(image)
            restored = image_to_tensor(decoded)
            similarity = ms_ssim(original, restored) if min(image.size) >= 16 else math.nan
            points.append(
                Point(
                    name,
                    setting,
                    path.name,
                    len(data) * 8 / pixels,
                    psnr(original, restored),
                    similarity,
                    encode_ms,
                    decode_ms,
                )
            )
        advance()
    return points


def means(points: list[Point]) -> list[Mean]:
    """Per codec and setting, in the order first seen."""
    groups: dict[tuple[str, int], list[Point]] = {}
    for p in points:
        groups.setdefault((p.codec, p.setting), []).append(p)
    return [
        Mean(
            codec,
            setting,
            statistics.fmean(p.bpp for p in group),
            statistics.fmean(p.psnr for p in group),
            statistics.fmean(p.ms_ssim for p in group),
            statistics.median(p.encode_ms for p in group),
            statistics.median(p.decode_ms for p in group),
        )
        for (codec, setting), group in groups.items()
    ]


def curve(rows: list[Mean], codec: str) -> list[Mean]:
    return sorted((r for r in rows if r.codec == codec), key=lambda r: r.bpp)


def deltas(rows: list[Mean], model: str) -> list[Delta]:
    """BD-rate, BD-PSNR and BD-MS-SSIM of `model` against each other codec, over their common range.

    NaN where the curves share too little range (or the model has fewer than two points)."""
    import warnings

    import bjontegaard as bd

    test = curve(rows, model)
    out = []
    for anchor in dict.fromkeys(r.codec for r in rows if r.codec != model):
        ref = curve(rows, anchor)

        def measure(fn, dist: str, ref: list[Mean] = ref) -> float:
            if len(test) < 2 or len(ref) < 2:
                return math.nan
            args = (
                [r.bpp for r in ref],
                [getattr(r, dist) for r in ref],
                [r.bpp for r in test],
                [getattr(r, dist) for r in test],
            )
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return float(fn(*args, method="akima", require_matching_points=False, min_overlap=0))
            except (ValueError, ZeroDivisionError):
                return math.nan

        out.append(
            Delta(anchor, measure(bd.bd_rate, "psnr"), measure(bd.bd_psnr, "psnr"), measure(bd.bd_psnr, "ms_ssim"))
        )
    return out


def write_json(path: Path, points: list[Point], rows: list[Mean], found: list[Delta], overwrite: bool = True) -> None:
    body = {
        "points": [dataclasses.asdict(p) for p in points],
        "means": [dataclasses.asdict(r) for r in rows],
        "deltas": [dataclasses.asdict(d) for d in found],
    }
    write_atomic(path, (json.dumps(body, indent=1, allow_nan=True) + "\n").encode(), overwrite)


def plot(path: Path, rows: list[Mean], title: str = "", overwrite: bool = True) -> None:
    """PSNR-vs-bpp and MS-SSIM-vs-bpp curves of every codec, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for codec in dict.fromkeys(r.codec for r in rows):
        points = curve(rows, codec)
        for ax, metric in zip(axes, ("psnr", "ms_ssim"), strict=True):
            ax.plot([p.bpp for p in points], [getattr(p, metric) for p in points], marker="o", ms=3, label=codec)
    for ax, label in zip(axes, ("PSNR (dB)", "MS-SSIM"), strict=True):
        ax.set_xlabel("bits per pixel (file size)")
        ax.set_ylabel(label)
        ax.set_xlim(0, 0.6)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(figure)
    write_atomic(path, buffer.getvalue(), overwrite)
