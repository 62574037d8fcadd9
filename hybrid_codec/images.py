"""Reading images of any mode into RGB tensors, and tensors back into images."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from struct import error as struct_error
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CodecError, first_line
from .inputs import check_input, open_input

MAX_PIXELS = 64_000_000
"""Largest image the codec accepts by default (64 megapixels): a memory guard against a bomb or a
mistake, raised per call (`max_pixels`, `--max-pixels`) for scans and panoramas, which the codec
codes in tiles (`tiles.py`). The same limit is Pillow's decompression-bomb limit while a file opens."""

ORIENTATION = 0x0112  # the EXIF tag saying how the camera was held

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file as RGB, with a one-line error for anything wrong.

    `max_pixels` (default `MAX_PIXELS`) is checked on the header's size before any pixel is
    decoded, and Pillow's own decompression-bomb check runs with the same limit: raising it for a
    huge scan raises both, and neither is ever switched off.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    path = check_input(path)
    try:
        with warnings.catch_warnings(), quiet_stderr():  # Pillow's and libtiff's own lines: the error says it
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with pillow_limit(limit), open_input(path, "image") as file, Image.open(file) as image:
                check_size(*image.size, where=str(path), max_pixels=limit)
                image.load()
                if image.getexif().get(ORIENTATION, 1) != 1:  # a phone photo the right way up
                    image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except CodecError as exc:
        raise CodecError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        reason = f"{str(exc).rstrip('.')}; --max-pixels raises it"
        raise CodecError(f"{path}: too large for the limit of {limit:,} pixels ({reason})") from None
    except UnidentifiedImageError:
        raise CodecError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct_error, ZeroDivisionError) as exc:
        raise CodecError(f"{path}: corrupt or truncated image ({first_line(exc)})") from None


class _QuietStderr:
    """File descriptor 2 sent to /dev/null while any thread is inside: C libraries (libtiff) write there
    directly. Counted, so that threads decoding at once (the demo's) restore the real stderr once, last."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: int | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0:
                try:
                    sys.stderr.flush()
                    saved = os.dup(2)
                except (OSError, ValueError):  # no usable stderr: nothing to keep quiet
                    saved = None
                if saved is not None:
                    null = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(null, 2)
                    os.close(null)
                self.saved = saved
            self.depth += 1

    def leave(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0 and self.saved is not None:
                os.dup2(self.saved, 2)
                os.close(self.saved)
                self.saved = None


quiet_stderr = _QuietStderr()


@contextlib.contextmanager
def pillow_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit raised to `max_pixels` where that is above it (Pillow warns
    above its limit, which `open_image` makes an error), restored afterwards: its default (89 MP)
    would refuse a raised limit's images. Below it, `check_size` refuses first, naming the size."""
    saved = Image.MAX_IMAGE_PIXELS
    if saved is not None:
        Image.MAX_IMAGE_PIXELS = max(saved, max_pixels)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def check_size(width: int, height: int, where: str = "image", max_pixels: int | None = None) -> None:
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if width < 1 or height < 1:
        raise CodecError(f"{where}: empty image ({width}x{height})")
    if width * height > limit:
        raise CodecError(
            f"{where}: {width}x{height} is too large (at most {limit:,} pixels; --max-pixels raises the limit)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha is composited over white, 16-bit is scaled down, float
    images in [0, 1] are scaled up; NaN pixels are refused."""
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grayscale, or float
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise CodecError("the image holds NaN or infinite pixels")
        if image.mode == "F" and array.size and array.min() >= 0 and array.max() <= 1:
            array = array * 255.0  # float images in [0, 1]
        elif image.mode.startswith("I;16") or array.size and array.max() > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_to_tensor(image: ImageLike, max_pixels: int | None = None) -> torch.Tensor:
    """Path, PIL image, HxW(x3/4) uint8 array or (3, H, W) / (B, 3, H, W) float tensor -> (B, 3, H, W) in [0, 1]."""
    pixels = image_to_pixels(image, max_pixels)
    return pixels if pixels.is_floating_point() else pixels.float().div_(255.0)  # float keeps the HWC layout


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 pixels (any strides, read-only too) -> (3, H, W) float in [0, 1], in its own memory."""
    return torch.from_numpy(np.array(pixels, order="C")).permute(2, 0, 1).float().div_(255.0)


def image_to_pixels(image: ImageLike, max_pixels: int | None = None) -> torch.Tensor:
    """Like `image_to_tensor`, but a path, PIL image or array stays 8-bit: (1, 3, H, W) uint8, a view
    of the decoded HxWx3 pixels without a copy. Tensors come back as checked (B, 3, H, W) floats."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, max_pixels)
    if isinstance(image, Image.Image):
        check_size(*image.size, max_pixels=max_pixels)
        image = np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        return torch.from_numpy(rgb_array(image, max_pixels)).permute(2, 0, 1).unsqueeze(0)
    if not isinstance(image, torch.Tensor):
        raise CodecError(f"cannot encode a {type(image).__name__}: give a path, PIL image, uint8 array or tensor")
    if image.device.type == "meta":
        raise CodecError("the image tensor is on the meta device: it holds no pixels")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != 3:
        raise CodecError(f"expected a (3, H, W) or (B, 3, H, W) tensor, got {tuple(image.shape)}")
    check_size(image.shape[3], image.shape[2], max_pixels=max_pixels)
    if not image.is_floating_point():
        raise CodecError(f"expected a float tensor in [0, 1], got {image.dtype}")
    if not torch.isfinite(image).all():
        raise CodecError("the image tensor holds NaN or infinite values")
    return image.clamp(0, 1)


def rgb_array(array: np.ndarray, max_pixels: int | None = None) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 (or uint16) -> HxWx3 uint8."""
    # dtype and size first: the RGBA path below goes through uint8, which would hide a float or 16-bit array
    if array.ndim < 2:
        raise CodecError(f"expected an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    check_size(array.shape[1], array.shape[0], max_pixels=max_pixels)
    if array.dtype == np.uint16:
        array = (array.astype(np.float32) / 65535.0 * 255.0).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise CodecError(f"expected a uint8 (or uint16) array, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None].repeat(3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise CodecError(f"expected an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    if array.shape[-1] == 1:
        array = array.repeat(3, axis=-1)
    if array.shape[-1] == 4:
        array = np.asarray(to_rgb(Image.fromarray(np.ascontiguousarray(array), "RGBA")))
    # Pillow's arrays are read-only (torch wants writable memory), and a crop of a larger array is
    # strided: the encoder reads whole rows of a contiguous one (see `DynamicConv.reads_channels_last`)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = array.copy()
    return array


def tensor_to_image(image: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> 8-bit RGB PIL image."""
    if image.dim() == 4:
        image = image[0]
    array = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file below `folder`, recursively, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CodecError(f"{folder}: no such folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
