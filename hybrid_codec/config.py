"""The config that fully describes a model: its layer sizes, its name and its latent space.

Pure data: the bitstream reader validates latent files against it without building a model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import CodecError
from .inputs import load_json

LATENT_SPACES = ("native", "sd")
FAMILIES = ("hybrid", "dycnn", "dynet", "conv")
"""The layer families of encoder and decoder (models.py, docs/layers.md): DynamicConv (the default),
DY-CNN's DyConv2d, DyNet's DyNetConv2d, and a plain nn.Conv2d baseline."""
ATTENTION_FAMILIES = ("dycnn", "dynet")
"""The families whose attention pools the whole image: a latent depends on every pixel, not only its patch."""
MAX_SIZES = {"latent_channels": 64, "downscale": 32, "encoder_hidden": 512, "decoder_hidden": 512, "decoder_kernel": 15}
"""Bounds on a config's sizes, checked before a tensor is made: a weights file's metadata may ask for anything."""
MAX_PARAMETERS = 100_000_000  # 400 MB of float32 weights; the shipped models hold 0.5 M


def parameter_count(c: CodecConfig) -> int:
    """About how many weights the config's encoder and decoder hold: the hybrid family's DynamicConv
    predictors and similar_conv, which is also a bound for the other families at the same sizes."""

    def layer(out_channels: int, patch: int, hidden: int) -> int:
        return out_channels * (2 * patch * hidden + hidden * hidden + 16 * hidden + 2 * patch + 1)

    encoder = layer(c.latent_channels, 3 * c.downscale**2, c.encoder_hidden)
    return encoder + layer(3 * c.downscale**2, c.latent_channels * c.decoder_kernel**2, c.decoder_hidden)


@dataclass(frozen=True)
class CodecConfig:
    """Everything needed to rebuild a model; saved beside its weights."""

    name: str = "native"
    latent_space: str = "native"  # "native", or "sd": the raw (unscaled) Stable Diffusion VAE latent space
    latent_channels: int = 4
    downscale: int = 8  # encoder kernel and stride, decoder PixelShuffle factor
    encoder_hidden: int = 14  # the encoder's size: hidden units (hybrid) or kernels K (dycnn, dynet); conv has none
    decoder_hidden: int = 22  # the decoder's, likewise
    decoder_kernel: int = 3
    quality_levels: int = 0  # learned quantization steps and entropy tables (0: 8-bit min/max latents only)
    family: str = "hybrid"  # the layer family of encoder and decoder, one of FAMILIES

    def __post_init__(self) -> None:
        # a config also comes from a weights file's metadata: check types before building anything from it
        if not all(isinstance(v, str) for v in (self.name, self.latent_space, self.family)):
            raise CodecError(
                f"model name, latent space and family must be strings, not "
                f"{self.name!r}, {self.latent_space!r}, {self.family!r}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            least = 0 if f.name == "quality_levels" else 1
            if f.type in ("int", int) and (type(value) is not int or value < least):
                raise CodecError(f"config field {f.name!r} must be an integer >= {least}, not {value!r}")
        for name, most in MAX_SIZES.items():
            if getattr(self, name) > most:
                raise CodecError(f"config field {name!r} must be at most {most}, not {getattr(self, name)}")
        if parameter_count(self) > MAX_PARAMETERS:
            raise CodecError(f"config asks for {parameter_count(self):,} weights (at most {MAX_PARAMETERS:,})")
        if self.quality_levels > 255:
            raise CodecError(f"at most 255 quality levels, not {self.quality_levels}")
        if self.latent_space not in LATENT_SPACES:
            raise CodecError(f"unknown latent space {self.latent_space!r}; expected one of {LATENT_SPACES}")
        if self.family not in FAMILIES:
            raise CodecError(f"unknown layer family {self.family!r}; expected one of {FAMILIES}")
        if self.decoder_kernel % 2 == 0:
            raise CodecError(f"decoder_kernel must be odd, not {self.decoder_kernel}")

    @property
    def per_image_attention(self) -> bool:
        """Whether a latent depends on the whole image (dycnn, dynet): tiles would not be exact."""
        return self.family in ATTENTION_FAMILIES

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        if not self.quality_levels:  # the JSON of models from before quality levels, which their hash covers
            del fields["quality_levels"]
        if self.family == "hybrid":  # likewise from before the layer families
            del fields["family"]
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CodecConfig:
        if not isinstance(text, str | bytes):
            raise CodecError(f"model config must be JSON text, not {type(text).__name__}")
        fields = load_json(text, "invalid model config")
        try:
            if not isinstance(fields, dict):
                raise CodecError(f"model config must be a JSON object, not {type(fields).__name__}")
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(fields) - known
            if unknown:
                raise CodecError(f"unknown config fields {sorted(unknown)}")
            return cls(**fields)
        except (ValueError, TypeError) as exc:
            raise CodecError(f"invalid model config: {exc}") from None
