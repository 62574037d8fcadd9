"""The codec's encoder and decoder, a config that fully describes them, and their weights files.

A weights file is a safetensors file whose metadata holds the config as JSON, so loading
one executes no code and needs nothing beside it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .config import CodecConfig
from .errors import CodecError, first_line
from .inputs import load_json, read_input
from .layers import DyConv2d, DynamicConv, DyNetConv2d
from .levels import QualityLevels, RateProxy
from .paths import write_atomic
from .quantize import fake_quantize

__all__ = ["Autoencoder", "CodecConfig", "Decoder", "Encoder", "read_weights", "weights_bytes"]


def family_layer(
    family: str, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, size: int
) -> nn.Module:
    """One layer of the config's family; `size` is hybrid's hidden units or DY-CNN's and DyNet's K."""
    if family == "hybrid":
        return DynamicConv(in_channels, out_channels, kernel_size, stride=stride, padding=padding, hidden=size)
    if family == "dycnn":
        return DyConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, K=size)
    if family == "dynet":
        return DyNetConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, K=size)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)


class Encoder(nn.Module):
    """RGB (B, 3, H, W) with H and W multiples of 8 -> latent (B, 4, H/8, W/8).

    The image is float in [0, 1], or uint8 in [0, 255] as read from a file (the faster path).
    """

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        f = config.downscale
        self.conv = family_layer(config.family, 3, config.latent_channels, f, f, 0, config.encoder_hidden)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image.float() / 255 if image.dtype == torch.uint8 else image)


class Decoder(nn.Module):
    """Latent (B, 4, h, w) -> RGB (B, 3, 8h, 8w); clamped to [0, 1] unless `clamp=False` (training)."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        f = config.downscale
        k = config.decoder_kernel
        self.conv = family_layer(config.family, config.latent_channels, 3 * f * f, k, 1, k // 2, config.decoder_hidden)
        bias = self.conv.similar_conv.bias if config.family == "hybrid" else self.conv.bias
        nn.init.constant_(bias, 0.5)  # start at mid-grey, not at a random offset (each of K kernels: their mix too)
        self.shuffle = nn.PixelShuffle(f)

    def forward(self, latent: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        image = self.shuffle(self.conv(latent))
        return image.clamp(0, 1) if clamp else image


class Autoencoder(nn.Module):
    """Encoder + decoder + the config that describes them."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.levels = QualityLevels(config.quality_levels, config.latent_channels) if config.quality_levels else None
        self.rate: RateProxy | None = None  # attached by the rate-distortion recipe while it trains

    def forward(
        self, image: torch.Tensor, levels: torch.Tensor | None = None, generator: torch.Generator | None = None
    ):
        """The codec's round trip through 8-bit latents; unclamped while training.

        With `levels` (B,) 0-based, through those quality levels instead: (decoded, estimated bits (B,))
        from the attached `rate` (`levels.RateProxy`)."""
        latent = self.encoder(image)
        if levels is None:
            return self.decoder(fake_quantize(latent), clamp=not self.training)
        seen, bits = self.rate(latent, levels, generator)
        return self.decoder(seen, clamp=not self.training), bits

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The plain torch path, what `fast.FastAutoencoder` computes faster for the hybrid family."""
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    def weights_hash(self) -> str:
        """A short hash of the config and every tensor: latent files name the weights with it."""
        digest = hashlib.sha256(self.config.to_json().encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the weights and config to one safetensors file, atomically."""
        from safetensors.torch import save

        path = Path(path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        write_atomic(path, save(tensors, metadata={"format": "hybrid-codec-weights", "config": self.config.to_json()}))
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Autoencoder:
        """Load a weights file written by `save_pretrained`; executes no code."""
        config, tensors = read_weights(path)
        model = cls(config)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise CodecError(f"{path}: weights do not match their config ({first})") from None
        return model.to(device).eval()


def read_weights(path: str | os.PathLike) -> tuple[CodecConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a weights file, with a clear error for anything else.

    The header's JSON is checked (size, depth) and the config validated before any tensor is made;
    weights holding NaN or infinity are refused (they would encode files nothing can decode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    data = read_input(path, "weights file")
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 2 <= size <= len(data) - 8:
        raise CodecError(f"{path}: not a safetensors weights file (truncated or foreign header)")
    header = load_json(data[8 : 8 + size], f"{path}: safetensors header", max_bytes=MAX_HEADER_BYTES)
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != "hybrid-codec-weights" or "config" not in metadata:
        raise CodecError(f"{path}: a safetensors file, but not hybrid-codec weights (no config in its metadata)")
    try:
        config = CodecConfig.from_json(metadata["config"])
    except CodecError as exc:
        raise CodecError(f"{path}: {exc}") from None
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CodecError(f"{path}: not a safetensors weights file ({first_line(exc)})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CodecError(f"{path}: weights {name!r} hold NaN or infinite values")
    return config, tensors


MAX_HEADER_BYTES = 16 << 20  # a safetensors header: the names, shapes and offsets of the tensors, and metadata


def weights_bytes(module: nn.Module) -> int:
    """Size of a module's parameters and buffers at float32."""
    return sum(t.numel() * 4 for t in module.state_dict().values() if t.is_floating_point())
