"""The codec's encoder and decoder, a config that fully describes them, and their weights files.

A weights file is a safetensors file whose metadata holds the config as JSON, so loading
one executes no code and needs nothing beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CodecError
from .layers import DynamicConv
from .quantize import fake_quantize

LATENT_SPACES = ("native", "sd")


@dataclass(frozen=True)
class CodecConfig:
    """Everything needed to rebuild a model; saved beside its weights."""

    name: str = "native"
    latent_space: str = "native"  # "native", or "sd": the raw (unscaled) Stable Diffusion VAE latent space
    latent_channels: int = 4
    downscale: int = 8  # encoder kernel and stride, decoder PixelShuffle factor
    encoder_hidden: int = 14
    decoder_hidden: int = 22
    decoder_kernel: int = 3

    def __post_init__(self) -> None:
        # a config also comes from a weights file's metadata: check types before building anything from it
        if not isinstance(self.name, str) or not isinstance(self.latent_space, str):
            raise CodecError(f"model name and latent space must be strings, not {self.name!r}, {self.latent_space!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (type(value) is not int or value < 1):
                raise CodecError(f"config field {f.name!r} must be a positive integer, not {value!r}")
        if self.latent_space not in LATENT_SPACES:
            raise CodecError(f"unknown latent space {self.latent_space!r}; expected one of {LATENT_SPACES}")
        if self.decoder_kernel % 2 == 0:
            raise CodecError(f"decoder_kernel must be odd, not {self.decoder_kernel}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CodecConfig:
        try:
            fields = json.loads(text)
            if not isinstance(fields, dict):
                raise CodecError(f"model config must be a JSON object, not {type(fields).__name__}")
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(fields) - known
            if unknown:
                raise CodecError(f"unknown config fields {sorted(unknown)}")
            return cls(**fields)
        except (ValueError, TypeError) as exc:
            raise CodecError(f"invalid model config: {exc}") from None


class Encoder(nn.Module):
    """RGB (B, 3, H, W) with H and W multiples of 8 -> latent (B, 4, H/8, W/8).

    The image is float in [0, 1], or uint8 in [0, 255] as read from a file (the faster path).
    """

    def __init__(self, config: CodecConfig, kernel_init_scale: float = 1.0) -> None:
        super().__init__()
        f = config.downscale
        self.conv = DynamicConv(
            3, config.latent_channels, f, stride=f, hidden=config.encoder_hidden, kernel_init_scale=kernel_init_scale
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image, input_scale=1 / 255) if image.dtype == torch.uint8 else self.conv(image)


class Decoder(nn.Module):
    """Latent (B, 4, h, w) -> RGB (B, 3, 8h, 8w); clamped to [0, 1] unless `clamp=False` (training)."""

    def __init__(self, config: CodecConfig, kernel_init_scale: float = 1.0) -> None:
        super().__init__()
        f = config.downscale
        self.conv = DynamicConv(
            config.latent_channels,
            3 * f * f,
            config.decoder_kernel,
            padding="same",
            hidden=config.decoder_hidden,
            kernel_init_scale=kernel_init_scale,
        )
        nn.init.constant_(self.conv.similar_conv.bias, 0.5)  # start at mid-grey, not at a random offset
        self.shuffle = nn.PixelShuffle(f)

    def forward(self, latent: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        image = self.shuffle(self.conv(latent))
        return image.clamp(0, 1) if clamp else image


class Autoencoder(nn.Module):
    """Encoder + decoder + the config that describes them."""

    def __init__(self, config: CodecConfig, kernel_init_scale: float = 1.0) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, kernel_init_scale)
        self.decoder = Decoder(config, kernel_init_scale)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The codec's round trip through 8-bit latents; unclamped while training."""
        return self.decoder(fake_quantize(self.encoder(image)), clamp=not self.training)

    def weights_hash(self) -> str:
        """A short hash of the config and every tensor: latent files name the weights with it."""
        digest = hashlib.sha256(self.config.to_json().encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the weights and config to one safetensors file, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "hybrid-codec-weights", "config": self.config.to_json()})
        os.replace(tmp, path)
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
    """The config and tensors of a weights file, with a clear error for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise CodecError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CodecError(f"{path}: not a safetensors weights file ({exc})") from None
    if metadata.get("format") != "hybrid-codec-weights" or "config" not in metadata:
        raise CodecError(f"{path}: a safetensors file, but not hybrid-codec weights (no config in its metadata)")
    return CodecConfig.from_json(metadata["config"]), tensors


def weights_bytes(module: nn.Module) -> int:
    """Size of a module's parameters and buffers at float32."""
    return sum(t.numel() * 4 for t in module.state_dict().values() if t.is_floating_point())
