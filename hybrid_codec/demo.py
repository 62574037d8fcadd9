"""`hybrid-codec demo`: a local web page to judge the codec by eye, beside JPEG and WebP at the same file size.

The measuring is the library's (the round trips `eval` times in `rd`, the metrics of `metrics`); this
module picks the classic codecs' same-size settings, lays out the page, and keeps its files in one
temporary folder that is removed when the server stops. Gradio (the `[demo]` extra) is imported only
when the page is built, so the codec itself never needs it.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, UnidentifiedImageError

from . import bitstream
from .codec import Codec, load_codec
from .errors import CodecError
from .evaluation import bits_per_pixel
from .images import check_size, image_to_tensor, open_image
from .metrics import ms_ssim, psnr
from .paths import LATENT_SUFFIX, LATENT_SUFFIXES, PT_SUFFIX
from .rd import classic_roundtrip, hybrid_roundtrip
from .zoo import DEFAULT_MODEL, SHIPPED

MAX_PIXELS = 8_000_000
"""Largest upload the page takes: each one costs about 16 encodes (the same-size searches), in a web request."""

SAME_SIZE = {"JPEG": ("JPEG", 1, 95), "WebP": ("WEBP", 0, 100)}  # Pillow format and quality range searched
CROP, ZOOM = 96, 3  # the zoomed crop: a square this many pixels wide from the middle, enlarged this much


@dataclass
class Result:
    """One codec's file of the image and what decoding it gives."""

    codec: str
    setting: str  # "level 6", "q37", "8-bit"
    data: bytes
    decoded: Image.Image
    bpp: float
    psnr: float
    ms_ssim: float
    encode_ms: float
    decode_ms: float
    over_budget: bool = False  # even the classic codec's smallest file is larger than the model's


def measure(codec: str, setting: str, original: Image.Image, roundtrip: tuple, over_budget: bool = False) -> Result:
    """A round trip's (bytes, decoded, encode ms, decode ms) -> its Result, with the metrics `eval` reports."""
    data, decoded, encode_ms, decode_ms = roundtrip
    a, b = image_to_tensor(original), image_to_tensor(decoded)
    return Result(
        codec,
        setting,
        data,
        decoded,
        bits_per_pixel(len(data), original.height, original.width),
        psnr(a, b),
        ms_ssim(a, b) if min(original.size) >= 16 else math.nan,
        encode_ms,
        decode_ms,
        over_budget,
    )


def same_size(image: Image.Image, fmt: str, budget: int, low: int, high: int) -> tuple[int, tuple, bool]:
    """The highest Pillow quality in [low, high] whose file is at most `budget` bytes (binary search: a file
    grows with quality), its round trip, and whether it is over budget (the lowest quality already is)."""
    best = None
    while low <= high:
        middle = (low + high) // 2
        trip = classic_roundtrip(image, fmt, middle)
        if len(trip[0]) <= budget:
            best, low = (middle, trip), middle + 1
        else:
            high = middle - 1
    if best is None:  # nothing fits: show the smallest file, marked as larger
        quality = high + 1
        return quality, classic_roundtrip(image, fmt, quality), True
    return best[0], best[1], False


def compare(codec: Codec, image: Image.Image, quality: int | None, classics: tuple[str, ...] = tuple(SAME_SIZE)):
    """The model's file of `image` at `quality`, then each classic codec at the nearest size not larger."""
    level = codec.check_quality(quality)
    ours = measure(codec.name, f"level {level}" if level else "8-bit", image, hybrid_roundtrip(codec, image, level))
    results = [ours]
    for name in classics:
        fmt, low, high = SAME_SIZE[name]
        q, trip, over = same_size(image, fmt, len(ours.data), low, high)
        results.append(measure(name, f"q{q}", image, trip, over))
    return results


def open_upload(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded image as RGB; a one-line CodecError for a file that is not one or is too large for the page."""
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as header:  # the size before the pixels: a huge image is refused unread
                size = header.size
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CodecError(f"{name}: not an image (nor a {' or '.join(LATENT_SUFFIXES)} latent file)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise CodecError(f"{name}: corrupt image ({exc})") from None
    if size[0] * size[1] > max_pixels:
        raise CodecError(f"{name}: {size[0]}x{size[1]} is too large for the demo (at most {max_pixels:,} pixels)")
    check_size(*size, where=name)
    return open_image(path)


def is_latent_file(path: str | os.PathLike) -> bool:
    return str(path).endswith(LATENT_SUFFIXES) or Path(path).suffix == ".pt"


def latent_name(image_name: str, level: int | None) -> str:
    """What the download is called: the image's stem, the level, and the suffix of its kind of file."""
    stem = Path(image_name).stem or "image"
    return f"{stem}.q{level}{LATENT_SUFFIX}" if level else f"{stem}{PT_SUFFIX}"


def zoomed(images: list[tuple[str, Image.Image]], crop: int = CROP, zoom: int = ZOOM) -> Image.Image:
    """The same middle crop of every image, enlarged without smoothing, labelled, side by side."""
    width, height = images[0][1].size
    side_w, side_h = min(crop, width), min(crop, height)
    left, top = (width - side_w) // 2, (height - side_h) // 2
    gap, band = 6, 18
    tile_w, tile_h = side_w * zoom, side_h * zoom
    canvas = Image.new("RGB", (len(images) * (tile_w + gap) - gap, tile_h + band), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, image) in enumerate(images):
        tile = image.crop((left, top, left + side_w, top + side_h)).resize((tile_w, tile_h), Image.Resampling.NEAREST)
        canvas.paste(tile, (i * (tile_w + gap), band))
        draw.text((i * (tile_w + gap) + 2, 3), label, fill="black")
    return canvas


def stats_table(results: list[Result], pixels: int) -> str:
    """The numbers of each codec as an HTML table, one row per codec (the browser test reads it by `data-codec`)."""
    head = "".join(f"<th>{c}</th>" for c in ("codec", "setting", "bytes", "bpp", "PSNR dB", "MS-SSIM", "encode ms"))
    rows = []
    for r in results:
        note = " (smallest; larger)" if r.over_budget else ""
        cells = (
            r.codec,
            r.setting + note,
            f"{len(r.data):,}",
            f"{r.bpp:.3f}",
            f"{r.psnr:.2f}",
            f"{r.ms_ssim:.4f}",
            f"{r.encode_ms:.1f}",
            f"{r.decode_ms:.1f}",
        )
        rows.append(f'<tr data-codec="{html.escape(r.codec)}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells))
    return (
        f'<table class="stats"><tr>{head}<th>decode ms</th></tr>{"".join(rows)}</table>'
        f"<p>{pixels:,} pixels; JPEG and WebP at the highest quality whose file is not larger than the model's.</p>"
    )


@dataclass
class View:
    """Everything the page shows after one event; `latent` is the file to download (None: nothing to offer)."""

    message: str = ""
    original: Image.Image | None = None
    decoded: Image.Image | None = None
    jpeg: Image.Image | None = None
    webp: Image.Image | None = None
    zoom: Image.Image | None = None
    stats: str = ""
    latent: str | None = None


class Demo:
    """The page's state and work: codecs loaded once each, files written under one folder of its own."""

    def __init__(self, model: str | None = None, device: str = "auto", workdir: str | os.PathLike | None = None):
        first = model or DEFAULT_MODEL
        self.choices = [first] + [name for name in SHIPPED if name != first]
        self.device = device
        self.max_pixels = MAX_PIXELS
        self._codecs: dict[str, Codec] = {}
        self.codec(first)  # a bad --model fails here, before the server starts
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hybrid-codec-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def codec(self, name: str) -> Codec:
        if name not in self._codecs:
            self._codecs[name] = load_codec(name, self.device)
        return self._codecs[name]

    def levels(self, name: str) -> int:
        return self.codec(name).quality_levels

    def run(self, upload: str | None, model: str, quality: int | float | None) -> View:
        """An uploaded image through `model` at `quality`, or an uploaded latent file decoded; errors as one line."""
        if not upload:
            return View("Drop an image (or a latent file) above.")
        try:
            if is_latent_file(upload):
                return self._decode(upload)
            return self._compare(upload, model, quality)
        except CodecError as exc:
            return View(f"**Error:** {exc}")

    def _compare(self, upload: str, model: str, quality: int | float | None) -> View:
        image = open_upload(upload, self.max_pixels)
        codec = self.codec(model)
        level = int(quality) if codec.quality_levels and quality is not None else None
        results = compare(codec, image, min(level, codec.quality_levels) if level else None)
        ours = results[0]
        target = self._write(latent_name(Path(upload).name, codec.check_quality(level)), ours.data)
        labelled = [("original", image)] + [(f"{r.codec} {r.setting}", r.decoded) for r in results]
        return View(
            f"{Path(upload).name}: {image.width}x{image.height}",
            image,
            ours.decoded,
            results[1].decoded,
            results[2].decoded,
            zoomed(labelled),
            stats_table(results, image.width * image.height),
            target,
        )

    def _decode(self, upload: str) -> View:
        data = Path(upload).read_bytes()
        latent = bitstream.read(data, Path(upload).name)
        codec = next((self.codec(n) for n in self.choices if self.codec(n).weights_hash == latent.weights), None)
        if codec is None:
            raise CodecError(
                f"{Path(upload).name}: made by weights {latent.weights}, which none of the page's models "
                f"({', '.join(self.choices)}) has"
            )
        decoded, decode_ms = _timed(lambda: codec.decode(latent))
        level = f"quality {latent.level}, " if latent.level else ""
        bpp = bits_per_pixel(len(data), decoded.height, decoded.width)
        return View(
            f"{Path(upload).name}: a latent file of model {codec.name!r}, {level}{decoded.width}x{decoded.height}, "
            f"{len(data):,} bytes, {bpp:.3f} bpp, decoded in {decode_ms:.1f} ms",
            decoded=decoded,
        )

    def _write(self, name: str, data: bytes) -> str:
        folder = Path(tempfile.mkdtemp(dir=self.workdir))  # its own folder: the download keeps the plain name
        target = folder / name
        target.write_bytes(data)
        return str(target)

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _timed(job: Callable):
    begin = time.perf_counter()
    out = job()
    return out, (time.perf_counter() - begin) * 1000


def build(demo: Demo):
    """The Gradio page over `demo`."""
    import gradio as gr

    first = demo.choices[0]
    with gr.Blocks(title="hybrid-codec demo", analytics_enabled=False, delete_cache=(600, 600)) as page:
        gr.Markdown(
            "# hybrid-codec\nDrop an image: the model's file at the chosen quality level beside JPEG and WebP at the "
            "same size (the highest quality whose file is not larger). A `.hyb` or `.latent.pt` file is decoded."
        )
        with gr.Row():
            upload = gr.File(label="image or latent file", elem_id="upload", type="filepath")
            with gr.Column():
                model = gr.Radio(demo.choices, value=first, label="model", elem_id="model")
                levels = demo.levels(first)
                quality = gr.Slider(  # Gradio refuses a slider whose maximum is its minimum: a model without levels
                    1,
                    max(levels, 2),
                    value=min(6, levels) or 1,
                    step=1,
                    label="quality level",
                    elem_id="quality",
                    interactive=levels > 0,
                )
                latent = gr.File(label="latent file", elem_id="latent", interactive=False)
        message = gr.Markdown(elem_id="message")
        stats = gr.HTML(elem_id="stats")
        zoom = gr.Image(label="middle crop, enlarged", format="png", elem_id="zoom", interactive=False)
        with gr.Row():
            original = gr.Image(label="original", format="png", elem_id="original", interactive=False)
            decoded = gr.Image(label="hybrid-codec", format="png", elem_id="decoded", interactive=False)
        with gr.Row():
            jpeg = gr.Image(label="JPEG, same size", format="png", elem_id="jpeg", interactive=False)
            webp = gr.Image(label="WebP, same size", format="png", elem_id="webp", interactive=False)

        outputs = [message, original, decoded, jpeg, webp, zoom, stats, latent]

        def show(upload_path, model_name, level):
            view = demo.run(upload_path, model_name, level)
            return [view.message, view.original, view.decoded, view.jpeg, view.webp, view.zoom, view.stats, view.latent]

        def pick_model(model_name):
            count = demo.levels(model_name)
            return gr.Slider(maximum=max(count, 2), value=min(6, count) or 1, interactive=count > 0)

        upload.change(show, [upload, model, quality], outputs, trigger_mode="always_last")
        quality.change(show, [upload, model, quality], outputs, trigger_mode="always_last")
        model.change(pick_model, model, quality).then(show, [upload, model, quality], outputs)
    return page


def serve(
    port: int = 7860,
    model: str | None = None,
    device: str = "auto",
    host: str = "127.0.0.1",
    block: bool = True,
    ready: Callable[[str], None] = lambda url: None,
):
    """Start the page on host:port; with `block`, until interrupted, then remove every file it made.

    Without `block` it returns (page, stop): the test's way to run it in the background."""
    workdir = Path(tempfile.mkdtemp(prefix="hybrid-codec-demo-"))
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")  # uploads and served copies too: all under workdir
    page = None

    def stop() -> None:
        if page is not None:
            page.close(verbose=False)
        shutil.rmtree(workdir, ignore_errors=True)

    try:
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise CodecError("the demo needs the [demo] extra: pip install 'hybrid-codec[demo]'") from None
        page = build(Demo(model, device, workdir / "files"))  # a bad --model fails here, before any port is bound
        page.queue(default_concurrency_limit=1)
        page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
        ready(page.local_url)
    except BaseException:
        stop()
        raise
    if not block:
        return page, stop
    try:
        page.block_thread()
    finally:
        stop()
