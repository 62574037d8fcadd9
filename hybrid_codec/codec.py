"""The codec: images of any size in, latent objects and files out, and back.

`encode_tensor` / `decode_tensor` are the batched tensor-level calls for training and SD work;
`encode` / `decode` add quantization (a quality level's learned steps, or 8-bit min/max for
models without levels) and exact cropping to any size; `compress` / `decompress` add the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import bitstream, compact
from .bitstream import Latent
from .compact import Packed
from .entropy import CODE_LIMIT
from .errors import CodecError
from .fast import FastAutoencoder
from .images import ImageLike, check_size, image_to_pixels, open_image, rgb_array, tensor_to_image, to_rgb
from .models import Autoencoder
from .paths import save_image, write_atomic
from .quantize import dequantize, quantize
from .runtime import check_device
from .tiles import TILE, check_tile, decode_tiled, encode_tiled
from .zoo import DEFAULT_MODEL, SHIPPED, resolve_weights

DEFAULT_QUALITY = 6  # the knee of the curve: see the README


class Codec:
    """A model ready to encode and decode, on one device, in eval mode.

    `max_pixels` is the largest image it encodes or decodes (a memory guard, `images.MAX_PIXELS`
    by default); images larger than `tile` x `tile` pixels are coded in tiles (`tiles.py`), with
    the same result: `tile=None` codes them whole. The families whose attention pools the whole
    image (dycnn, dynet: `config.per_image_attention`) always code whole, since a tile's latents
    would depend on the tile (docs/layers.md).
    """

    def __init__(
        self,
        model: Autoencoder,
        device: str | torch.device = "cpu",
        max_pixels: int | None = None,
        tile: int | None = TILE,
    ) -> None:
        if not isinstance(model, Autoencoder):
            raise CodecError(f"Codec needs an Autoencoder, not a {type(model).__name__}")
        if max_pixels is not None and (type(max_pixels) is not int or max_pixels < 1):
            raise CodecError(f"max_pixels must be a positive integer, not {max_pixels!r}")
        self.max_pixels = max_pixels
        self.tile = None if tile is None else check_tile(tile, model.config.downscale)
        tensors = model.state_dict().values()
        if any(t.device.type == "meta" for t in tensors):
            raise CodecError("the model's weights are on the meta device: they hold no values")
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
            raise CodecError("the model's weights hold NaN or infinite values: its latents could not be decoded")
        if model.config.per_image_attention:
            self.tile = None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.name = model.config.name
        self.weights_hash = model.weights_hash()
        # the weights are fixed from here on: latent files name their hash; the C kernel serves DynamicConv only
        self.fast = FastAutoencoder(self.model) if self.config.family == "hybrid" else self.model
        self.levels = self.model.levels  # None for models without quality levels

    @property
    def quality_levels(self) -> int:
        return self.levels.count if self.levels is not None else 0

    def check_quality(self, quality: int | None) -> int | None:
        """The level to encode at: `quality`, or the default; None for a model without levels."""
        if self.levels is None:
            if quality is not None:
                raise CodecError(f"model {self.name!r} has no quality levels; leave out the quality")
            return None
        if quality is None:
            return min(DEFAULT_QUALITY, self.quality_levels)
        if type(quality) is not int or not 1 <= quality <= self.quality_levels:
            raise CodecError(f"quality must be an integer from 1 to {self.quality_levels}, not {quality!r}")
        return quality

    @torch.inference_mode()
    def encode_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] or uint8 in [0, 255], any H and W -> float latents
        (B, 4, ceil(H/8), ceil(W/8)).

        Sizes that are not multiples of 8 are padded by repeating the last row and column.
        """
        if not isinstance(images, torch.Tensor) or images.device.type == "meta" or images.dim() != 4:
            raise CodecError("expected an image tensor (B, 3, H, W) with data")
        if images.shape[1] != 3:
            raise CodecError(f"expected an image tensor (B, 3, H, W), got {tuple(images.shape)}")
        f = self.config.downscale
        height, width = images.shape[-2:]
        check_size(width, height, max_pixels=self.max_pixels)
        pad_h, pad_w = -height % f, -width % f
        images = images.to(self.device, torch.uint8 if images.dtype == torch.uint8 else torch.float32)
        if pad_h or pad_w:
            images = pad_replicate(images, pad_h, pad_w)
        return self.fast.encode(images)

    @torch.inference_mode()
    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Float latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [0, 1]."""
        return self.fast.decode(self.decodable(latents))

    def decodable(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents as the decoder takes them, float32 on the codec's device; CodecError if they cannot be."""
        if not isinstance(latents, torch.Tensor) or latents.device.type == "meta":
            raise CodecError(f"expected a latent tensor with data, not {type(latents).__name__}")
        if latents.dim() != 4 or latents.shape[1] != self.config.latent_channels or not latents.numel():
            raise CodecError(f"expected latents (B, {self.config.latent_channels}, h, w), got {tuple(latents.shape)}")
        f, (h, w) = self.config.downscale, latents.shape[2:]  # the smallest image such latents code:
        check_size(f * (w - 1) + 1, f * (h - 1) + 1, "latents' image", max_pixels=self.max_pixels)
        if not torch.isfinite(latents).all():
            raise CodecError("the latents hold NaN or infinite values")
        return latents.to(self.device, torch.float32)

    def roundtrip_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Encode, quantize to 8 bits, decode and crop back: what a latent file gives."""
        height, width = images.shape[-2:]
        latents = dequantize(*quantize(self.encode_tensor(images)))
        return self.decode_tensor(latents)[..., :height, :width]

    def encode(self, image: ImageLike, quality: int | None = None) -> Latent | list[Latent]:
        """An image (path, PIL, uint8 array or tensor) -> a Latent; a batch -> a list of them.

        `quality` is the level, 1 (smallest file) to `quality_levels`; by default `DEFAULT_QUALITY`.
        A (B, 3, H, W) tensor is a batch, and gives a list even when B is 1.
        """
        level = self.check_quality(quality)
        batched = isinstance(image, torch.Tensor) and image.dim() == 4
        if isinstance(image, (str, os.PathLike)):
            image = open_image(image, self.max_pixels)
        if self.tiles(image):  # a PIL image is read one tile at a time, never copied whole
            if isinstance(image, Image.Image):
                check_size(*image.size, max_pixels=self.max_pixels)
                pixels = to_rgb(image)
            else:
                pixels = rgb_array(image, self.max_pixels)
            latent = encode_tiled(self.encode_tensor, pixels, self.tile, self.config.downscale)
            height, width = (pixels.height, pixels.width) if isinstance(pixels, Image.Image) else pixels.shape[:2]
        else:
            images = image_to_pixels(image, self.max_pixels)  # 8-bit images stay 8-bit: the encoder reads them
            latent = self.encode_tensor(images)
            height, width = images.shape[-2:]
        if level is None:
            codes, low, step = quantize(latent)
        else:
            codes = self.levels.codes(latent.cpu(), level)
            low = self.levels.offset.expand(len(codes), -1)
            step = self.levels.steps[level - 1].expand(len(codes), -1)
        latents = [
            Latent(
                codes=codes[i].cpu(),
                low=low[i].cpu(),
                step=step[i].cpu(),
                height=height,
                width=width,
                model=self.name,
                weights=self.weights_hash,
                latent_space=self.config.latent_space,
                level=level,
            )
            for i in range(latent.shape[0])
        ]
        return latents if batched else latents[0]

    def tiles(self, image: ImageLike) -> bool:
        """Whether `image` (a PIL image or an array: tensors are coded whole) is coded in tiles."""
        if self.tile is None:
            return False
        if isinstance(image, Image.Image):
            pixels = image.width * image.height
        elif isinstance(image, np.ndarray) and image.ndim >= 2:
            pixels = image.shape[0] * image.shape[1]
        else:
            return False
        return pixels > self.tile * self.tile

    def check(self, latent: Latent) -> None:
        """Refuse a latent made by other weights: decoding it would give noise, not an error."""
        if latent.weights != self.weights_hash:
            raise CodecError(
                f"this latent was made by model {latent.model!r} (weights {latent.weights}), "
                f"not by the weights decoding it ({self.name!r}, {self.weights_hash}); "
                "decode it with the weights that encoded it (--model WEIGHTS.safetensors)"
            )
        if latent.codes.shape[0] != self.config.latent_channels:
            raise CodecError(
                f"latent has {latent.codes.shape[0]} channels; this model uses {self.config.latent_channels}"
            )

    def decode(self, latent: Latent | Packed | bytes | str | os.PathLike) -> Image.Image:
        """A Latent (or a latent file, its bytes) -> PIL image of the original size."""
        latent = self.load(latent)
        self.check(latent)
        check_size(latent.width, latent.height, where="latent's image", max_pixels=self.max_pixels)
        latents = latent.dequantize()
        if self.tile is not None and latent.height * latent.width > self.tile * self.tile:
            halo = self.config.decoder_kernel // 2
            return decode_tiled(
                self.decode_tensor, latents, latent.height, latent.width, self.tile, halo, self.config.downscale
            )
        if not isinstance(self.fast, FastAutoencoder):
            return tensor_to_image(self.decode_tensor(latents)[0, :, : latent.height, : latent.width])
        with torch.inference_mode():
            pixels = self.fast.decode_pixels(self.decodable(latents))[0, : latent.height, : latent.width]
        return Image.fromarray(np.ascontiguousarray(pixels.cpu().numpy()), "RGB")

    def to_bytes(self, latent: Latent) -> bytes:
        """The compact file of a quality-level latent; the `.pt` dict of an 8-bit one."""
        if latent.level is None:
            return latent.to_bytes()
        self.check(latent)
        if self.levels is None or latent.level > self.quality_levels:
            raise CodecError(f"quality level {latent.level} does not exist in model {self.name!r}")
        if latent.codes.numel() and int(latent.codes.abs().max()) > CODE_LIMIT:
            raise CodecError(f"latent codes must lie within +-{CODE_LIMIT} to be entropy-coded")
        payload = self.levels.coder(latent.level).compress(latent.codes.numpy())
        return compact.pack(self.weights_hash, latent.level, latent.height, latent.width, payload)

    def compress(self, image: ImageLike, quality: int | None = None) -> bytes:
        """An image -> the bytes of its latent file."""
        return self.to_bytes(self.encode(image, quality))

    def decompress(self, data: bytes) -> Image.Image:
        return self.decode(data)

    def load(self, source: Latent | Packed | bytes | str | os.PathLike) -> Latent:
        """Any latent file, or its bytes, as a Latent; a compact one is entropy-decoded with this model's tables."""
        if isinstance(source, bytes):
            source = bitstream.read(source)
        elif not isinstance(source, Latent | Packed):
            source = bitstream.read_file(source)
        if isinstance(source, Latent):
            return source
        if source.weights != self.weights_hash:
            raise CodecError(
                f"this file was made by weights {source.weights}, not by the weights decoding it "
                f"({self.name!r}, {self.weights_hash}); decode it with the weights that encoded it (--model)"
            )
        if source.level > self.quality_levels:
            raise CodecError(f"quality level {source.level} does not exist in model {self.name!r}")
        check_size(source.width, source.height, where="latent's image", max_pixels=self.max_pixels)
        codes = source.codes(self.levels.coder(source.level), self.config.latent_channels, self.config.downscale)
        return Latent(
            codes=torch.from_numpy(codes),
            low=self.levels.offset.clone(),
            step=self.levels.steps[source.level - 1].clone(),
            height=source.height,
            width=source.width,
            model=self.name,
            weights=self.weights_hash,
            latent_space=self.config.latent_space,
            level=source.level,
        )


def pad_replicate(images: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom and right by repeating the last row and column, keeping a
    channels-last layout (an image array's) channels-last: the encoder reads that layout fastest."""
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        # (B, H, W, C) seen as a one-channel volume: replicate-pad its H and W, not C
        padded = F.pad(images.permute(0, 2, 3, 1)[:, None], (0, 0, 0, pad_w, 0, pad_h), mode="replicate")
        return padded[:, 0].permute(0, 3, 1, 2)
    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> CUDA, else MPS, else CPU; an unavailable device is a clear error."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    chosen = torch.device(check_device(str(device)))
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise CodecError("device cuda was asked for, but CUDA is not available here")
    if chosen.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CodecError("device mps was asked for, but MPS is not available here")
    return chosen


def load_codec(
    name_or_path: str | os.PathLike | None = None, device: str | torch.device = "auto", max_pixels: int | None = None
) -> Codec:
    """The codec with shipped weights by name ("native", "sd"), or weights from a path."""
    path: Path = resolve_weights(name_or_path)
    chosen = pick_device(device)
    return Codec(Autoencoder.from_pretrained(path, device=chosen), device=chosen, max_pixels=max_pixels)


def encode_file(
    codec: Codec, source: Path, target: Path, quality: int | None = None, overwrite: bool = True
) -> tuple[Latent, int]:
    """Encode one image file to a latent file (a `.pt` dict if `target` ends in .pt); the latent and its size.
    Without `overwrite`, a file at `target` (made meanwhile too) is an error, never replaced."""
    latent = codec.encode(open_image(source, codec.max_pixels), quality)
    data = latent.to_bytes() if target.suffix == ".pt" else codec.to_bytes(latent)
    write_atomic(target, data, overwrite)
    return latent, len(data)


class Codecs:
    """Loads each model once; a latent file's own model is the default for decoding it."""

    def __init__(self, model: str | None, device: str, max_pixels: int | None = None) -> None:
        # a bad --device or --model is one error before any file, not the same error once per file
        self.device = pick_device(device)
        if model is not None:
            resolve_weights(model)
        self.model = model
        self.max_pixels = max_pixels
        self._loaded: dict[str, Codec] = {}

    def get(self, name: str | None = None) -> Codec:
        name = self.model or name or DEFAULT_MODEL
        if self.model is None and name not in SHIPPED:
            raise CodecError(
                f"this latent names model {name!r}, which is not shipped: pass the weights file that made it, "
                f"--model {name}.safetensors (a trained model is named after its weights file)"
            )
        if name not in self._loaded:
            self._loaded[name] = load_codec(name, self.device, self.max_pixels)
        return self._loaded[name]

    def for_file(self, latent: Latent | Packed) -> Codec:
        """The codec for a latent file: --model, else the shipped model it names or whose weights made it."""
        if self.model is not None or isinstance(latent, Latent):
            return self.get(latent.model if isinstance(latent, Latent) else None)
        for name in SHIPPED:  # a compact file names only its weights' hash
            if self.get(name).weights_hash == latent.weights:
                return self.get(name)
        raise CodecError(f"no shipped model has the weights {latent.weights} that made this file; pass --model WEIGHTS")


def decode_file(codecs: Codecs, source: Path, target: Path, overwrite: bool = True) -> Image.Image:
    latent = bitstream.read_file(source)
    image = codecs.for_file(latent).decode(latent)
    save_image(image, target, overwrite)
    return image
