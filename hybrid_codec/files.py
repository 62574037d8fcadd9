"""File-level jobs behind the CLI: where outputs go, encoding/decoding files, describing files."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .codec import Codec
from .errors import CodecError
from .images import find_images, image_to_tensor, open_image
from .latent import Latent, write_atomic
from .metrics import ms_ssim, psnr

LATENT_SUFFIX = ".latent.pt"
DECODED_SUFFIX = ".decoded.png"


def expand_inputs(inputs: list[Path], pattern: str | None = None) -> list[Path]:
    """Files as given, folders replaced by the matching files below them (images, or `*pattern`)."""
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            below = find_images(path) if pattern is None else sorted(path.rglob(f"*{pattern}"))
            if not below:
                raise CodecError(f"{path}: folder holds no {'images' if pattern is None else pattern + ' files'}")
            found.extend(below)
        elif not path.exists():
            raise CodecError(f"{path}: no such file")
        else:
            found.append(path)
    return found


def output_paths(inputs: list[Path], output: Path | None, suffix: str, force: bool) -> list[Path]:
    """Where each input's output goes; refuses to overwrite anything unless `force`.

    No -o: beside the input. One input and -o not an existing folder: -o itself (a file).
    Otherwise -o is a folder (created if needed).
    """

    def stem(path: Path) -> str:
        name = path.name
        return name[: -len(LATENT_SUFFIX)] if name.endswith(LATENT_SUFFIX) else path.stem

    if output is not None and len(inputs) == 1 and not output.is_dir() and output.suffix:
        targets = [output]
    elif output is not None:
        if output.exists() and not output.is_dir():
            raise CodecError(f"{output}: several outputs need a folder, and this is a file")
        targets = [output / f"{stem(p)}{suffix}" for p in inputs]
    else:
        targets = [p.with_name(f"{stem(p)}{suffix}") for p in inputs]
    if len(set(targets)) != len(targets):
        raise CodecError("two inputs would write the same output file; use separate folders")
    if not force:
        existing = [t for t in targets if t.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise CodecError(f"{existing[0]} exists{more}; use --force to overwrite")
    for target in targets:
        if not target.parent.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CodecError(f"{target.parent}: cannot create folder ({exc.strerror})") from None
    return targets


def bits_per_pixel(size_bytes: int, height: int, width: int) -> float:
    return size_bytes * 8 / (height * width)


def encode_file(codec: Codec, source: Path, target: Path) -> tuple[Latent, int]:
    """Encode one image file to a latent file; returns the latent and the file's size."""
    latent = codec.encode(open_image(source))
    data = latent.to_bytes()
    write_atomic(target, data)
    return latent, len(data)


def save_image_atomic(image: Image.Image, target: Path) -> None:
    buffer = io.BytesIO()
    fmt = Image.registered_extensions().get(target.suffix.lower())
    if fmt is None:
        raise CodecError(f"{target}: unknown image extension (use .png, .jpg, .webp, ...)")
    image.save(buffer, format=fmt)
    write_atomic(target, buffer.getvalue())


class Codecs:
    """Loads each model once; a latent file's own model is the default for decoding it."""

    def __init__(self, model: str | None, device: str) -> None:
        from .codec import pick_device
        from .zoo import resolve_weights

        # a bad --device or --model is one error before any file, not the same error once per file
        self.device = pick_device(device)
        if model is not None:
            resolve_weights(model)
        self.model = model
        self._loaded: dict[str, Codec] = {}

    def get(self, name: str | None = None) -> Codec:
        from .codec import load_codec
        from .zoo import DEFAULT_MODEL, SHIPPED

        name = self.model or name or DEFAULT_MODEL
        if self.model is None and name not in SHIPPED:
            raise CodecError(f"this latent names model {name!r}, which is not shipped; pass --model WEIGHTS")
        if name not in self._loaded:
            self._loaded[name] = load_codec(name, self.device)
        return self._loaded[name]


def decode_file(codecs: Codecs, source: Path, target: Path) -> Image.Image:
    latent = Latent.load(source)
    image = codecs.get(latent.model).decode(latent)
    save_image_atomic(image, target)
    return image


def describe(path: Path) -> dict[str, object]:
    """What a latent file or a weights file holds, as label -> value."""
    if not path.is_file():
        raise CodecError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from .models import Autoencoder, weights_bytes

        model = Autoencoder.from_pretrained(path)
        c = model.config
        return {
            "kind": "hybrid-codec weights",
            "model": c.name,
            "latent space": c.latent_space,
            "weights hash": model.weights_hash(),
            "encoder": f"DynamicConv(3, {c.latent_channels}, kernel {c.downscale}, stride {c.downscale}, "
            f"hidden {c.encoder_hidden}): {weights_bytes(model.encoder) / 1000:.1f} KB",
            "decoder": f"DynamicConv({c.latent_channels}, {3 * c.downscale**2}, kernel {c.decoder_kernel}, "
            f"hidden {c.decoder_hidden}) + PixelShuffle({c.downscale}): {weights_bytes(model.decoder) / 1000:.1f} KB",
            "config": c.to_json(),
        }
    latent = Latent.load(path)
    size = path.stat().st_size
    return {
        "kind": "hybrid-codec latent (format 1)",
        "model": latent.model,
        "weights hash": latent.weights,
        "latent space": latent.latent_space,
        "image size": f"{latent.width}x{latent.height}",
        "latent shape": "x".join(str(n) for n in latent.codes.shape),
        "file size": f"{size:,} bytes",
        "bits per pixel": f"{bits_per_pixel(size, latent.height, latent.width):.3f}",
    }


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


def roundtrip(codec: Codec, source: Path) -> RoundTrip:
    """Encode and decode in memory; quality, size and timings of what the files would hold."""
    original = open_image(source)
    begin = time.perf_counter()
    latent = codec.encode(original)
    middle = time.perf_counter()
    decoded = codec.decode(latent)
    end = time.perf_counter()
    size = len(latent.to_bytes())
    a, b = image_to_tensor(original), image_to_tensor(decoded)
    return RoundTrip(
        original=original,
        decoded=decoded,
        psnr=psnr(a, b),
        ms_ssim=ms_ssim(a, b) if min(original.size) >= 16 else float("nan"),
        bpp=bits_per_pixel(size, original.height, original.width),
        latent_bytes=size,
        encode_ms=(middle - begin) * 1000,
        decode_ms=(end - middle) * 1000,
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


def human_bytes(n: int) -> str:
    return f"{n / 1000:.1f} KB" if n >= 1000 else f"{n} B"
