"""The codec: images of any size in, latent objects out, and back.

`encode_tensor` / `decode_tensor` are the batched tensor-level calls for training and SD work;
`encode` / `decode` add 8-bit quantization, latent files and exact cropping to any size.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .bitstream import Latent
from .errors import CodecError
from .fast import FastAutoencoder
from .images import ImageLike, image_to_pixels, open_image, tensor_to_image
from .models import Autoencoder
from .paths import save_image, write_atomic
from .quantize import dequantize, quantize
from .runtime import check_device
from .zoo import DEFAULT_MODEL, SHIPPED, resolve_weights


class Codec:
    """A model ready to encode and decode, on one device, in eval mode."""

    def __init__(self, model: Autoencoder, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.name = model.config.name
        self.weights_hash = model.weights_hash()
        self.fast = FastAutoencoder(self.model)  # the weights are fixed from here on: latent files name their hash

    @torch.inference_mode()
    def encode_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] or uint8 in [0, 255], any H and W -> float latents
        (B, 4, ceil(H/8), ceil(W/8)).

        Sizes that are not multiples of 8 are padded by repeating the last row and column.
        """
        f = self.config.downscale
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % f, -width % f
        images = images.to(self.device, torch.uint8 if images.dtype == torch.uint8 else torch.float32)
        if pad_h or pad_w:
            images = pad_replicate(images, pad_h, pad_w)
        return self.fast.encode(images)

    @torch.inference_mode()
    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Float latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [0, 1]."""
        if latents.dim() != 4 or latents.shape[1] != self.config.latent_channels:
            raise CodecError(f"expected latents (B, {self.config.latent_channels}, h, w), got {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise CodecError("the latents hold NaN or infinite values")
        return self.fast.decode(latents.to(self.device, torch.float32))

    def roundtrip_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Encode, quantize to 8 bits, decode and crop back: what a latent file gives."""
        height, width = images.shape[-2:]
        latents = dequantize(*quantize(self.encode_tensor(images)))
        return self.decode_tensor(latents)[..., :height, :width]

    def encode(self, image: ImageLike) -> Latent | list[Latent]:
        """An image (path, PIL, uint8 array or tensor) -> a Latent; a batch -> a list of them.

        A (B, 3, H, W) tensor is a batch, and gives a list even when B is 1.
        """
        batched = isinstance(image, torch.Tensor) and image.dim() == 4
        images = image_to_pixels(image)  # 8-bit images stay 8-bit: the encoder reads them directly
        codes, low, step = quantize(self.encode_tensor(images))
        latents = [
            Latent(
                codes=codes[i].cpu(),
                low=low[i].cpu(),
                step=step[i].cpu(),
                height=images.shape[-2],
                width=images.shape[-1],
                model=self.name,
                weights=self.weights_hash,
                latent_space=self.config.latent_space,
            )
            for i in range(images.shape[0])
        ]
        return latents if batched else latents[0]

    def check(self, latent: Latent) -> None:
        """Refuse a latent made by other weights: decoding it would give noise, not an error."""
        if latent.weights != self.weights_hash:
            raise CodecError(
                f"this latent was made by model {latent.model!r} (weights {latent.weights}), "
                f"not by the weights decoding it ({self.name!r}, {self.weights_hash}); "
                "decode it with the weights that encoded it (--model)"
            )
        if latent.codes.shape[0] != self.config.latent_channels:
            raise CodecError(
                f"latent has {latent.codes.shape[0]} channels; this model uses {self.config.latent_channels}"
            )

    def decode(self, latent: Latent | str | os.PathLike) -> Image.Image:
        """A Latent (or latent file) -> PIL image of the original size."""
        if not isinstance(latent, Latent):
            latent = Latent.load(latent)
        self.check(latent)
        image = self.decode_tensor(latent.dequantize())
        return tensor_to_image(image[0, :, : latent.height, : latent.width])


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


def load_codec(name_or_path: str | os.PathLike | None = None, device: str | torch.device = "auto") -> Codec:
    """The codec with shipped weights by name ("native", "sd"), or weights from a path."""
    path: Path = resolve_weights(name_or_path)
    chosen = pick_device(device)
    return Codec(Autoencoder.from_pretrained(path, device=chosen), device=chosen)


def encode_file(codec: Codec, source: Path, target: Path) -> tuple[Latent, int]:
    """Encode one image file to a latent file; returns the latent and the file's size."""
    latent = codec.encode(open_image(source))
    data = latent.to_bytes()
    write_atomic(target, data)
    return latent, len(data)


class Codecs:
    """Loads each model once; a latent file's own model is the default for decoding it."""

    def __init__(self, model: str | None, device: str) -> None:
        # a bad --device or --model is one error before any file, not the same error once per file
        self.device = pick_device(device)
        if model is not None:
            resolve_weights(model)
        self.model = model
        self._loaded: dict[str, Codec] = {}

    def get(self, name: str | None = None) -> Codec:
        name = self.model or name or DEFAULT_MODEL
        if self.model is None and name not in SHIPPED:
            raise CodecError(f"this latent names model {name!r}, which is not shipped; pass --model WEIGHTS")
        if name not in self._loaded:
            self._loaded[name] = load_codec(name, self.device)
        return self._loaded[name]


def decode_file(codecs: Codecs, source: Path, target: Path) -> Image.Image:
    latent = Latent.load(source)
    image = codecs.get(latent.model).decode(latent)
    save_image(image, target)
    return image
