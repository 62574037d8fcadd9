"""Quality levels: a learned quantization step per level and channel, and the rate term that trains them.

A level's codes are `round((latent - offset) / step[level])`. For training, `RateProxy` gives
what the decoder sees (rounded, with a straight-through gradient) and a differentiable estimate
of the bits: the codes with uniform noise, predicted from their neighbours exactly as the entropy
coder does (`entropy.phases`), the residual costed under a Laplace density whose scale is learned
per level, channel and context. After training, `export_levels` replaces the estimate by what is
shipped: integer tables counted from the real codes of the training images.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from . import entropy


class QualityLevels(nn.Module):
    """What a model ships for its levels: steps (L, C), offset (C,), integer tables (L, C, CONTEXTS, SYMBOLS)."""

    def __init__(self, levels: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("steps", torch.ones(levels, channels))
        self.register_buffer("offset", torch.zeros(channels))
        self.register_buffer(
            "tables",
            torch.full((levels, channels, entropy.CONTEXTS, entropy.SYMBOLS), entropy.TOTAL // entropy.SYMBOLS),
        )
        self.tables[..., 0] += entropy.TOTAL - self.tables.sum(-1)

    @property
    def count(self) -> int:
        return self.steps.shape[0]

    def codes(self, latent: torch.Tensor, level: int) -> torch.Tensor:
        """(..., C, h, w) float latents -> int32 codes of `level` (1-based), clipped to the coder's range."""
        step = self.steps[level - 1].to(latent)[:, None, None]
        scaled = (latent - self.offset.to(latent)[:, None, None]) / step
        return scaled.round().clamp(-entropy.CODE_LIMIT, entropy.CODE_LIMIT).to(torch.int32)

    def latent(self, codes: torch.Tensor, level: int) -> torch.Tensor:
        """Inverse of `codes`, up to half a step."""
        step = self.steps[level - 1][:, None, None]
        return codes.float() * step + self.offset[:, None, None]

    def coder(self, level: int) -> entropy.EntropyCoder:
        cache = self.__dict__.setdefault("_coders", {})
        if level not in cache:
            cache[level] = entropy.EntropyCoder(self.tables[level - 1].cpu().numpy())
        return cache[level]


class RateProxy(nn.Module):
    """Trainable steps and a differentiable bit count for the rate term of the training loss.

    Its parameters are stored divided by `GAIN`: they share the optimiser of a fine-tune whose
    learning rate suits weights, and have to travel much further (a log-scale from 0 to about 2)."""

    GAIN = 100.0

    def __init__(self, steps: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.scaled_log_steps = nn.Parameter(steps.log().clone() / self.GAIN)
        self.register_buffer("offset", offset.clone())
        levels, channels = steps.shape
        self.scaled_log_scales = nn.Parameter(torch.zeros(levels, channels, entropy.CONTEXTS))

    @property
    def log_steps(self) -> torch.Tensor:
        return self.scaled_log_steps * self.GAIN

    @property
    def log_scales(self) -> torch.Tensor:
        return self.scaled_log_scales * self.GAIN

    def forward(
        self, latent: torch.Tensor, level: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, C, h, w) and 0-based levels (B,) -> (what the decoder sees, bits per image (B,)).

        The rate's uniform noise comes from `generator`: a resumed run draws what an uninterrupted one would."""
        batch, channels, height, width = latent.shape
        step = self.log_steps[level].exp()[..., None, None]  # (B, C, 1, 1)
        scaled = (latent - self.offset[:, None, None]) / step
        rounded = scaled + (scaled.round() - scaled).detach()
        noise = torch.rand(scaled.shape, generator=generator, device=generator.device if generator else None)
        noisy = (scaled + noise.to(scaled) - 0.5).flatten(2)  # (B, C, h * w)
        bits = noisy.new_zeros(batch)
        for phase in entropy.phases(height, width):
            neighbours = noisy[:, :, torch.from_numpy(phase.neighbours).to(latent.device)]  # (B, C, 4, n)
            residual = noisy[:, :, torch.from_numpy(phase.targets).to(latent.device)] - neighbours.mean(2)
            spread = (neighbours.amax(2) - neighbours.amin(2)).detach()
            context = spread.floor().clamp(0, entropy.CONTEXTS - 1).long()  # (B, C, n)
            scales = self.log_scales[level].exp()  # (B, C, CONTEXTS)
            scale = torch.gather(scales, 2, context)
            bits = bits + laplace_bits(residual, scale).sum((1, 2))
        return rounded * step + self.offset[:, None, None], bits

    def steps(self) -> torch.Tensor:
        return self.log_steps.detach().exp()


def laplace_bits(residual: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """-log2 of a zero-mean Laplace's mass on [residual - 1/2, residual + 1/2]."""

    def cdf(x: torch.Tensor) -> torch.Tensor:
        return 0.5 - 0.5 * torch.sign(x) * torch.expm1(-x.abs() / scale)

    mass = cdf(residual + 0.5) - cdf(residual - 0.5)
    return -torch.log2(mass.clamp_min(1e-9))


def spread_steps(latents: Iterable[torch.Tensor], fractions: Iterable[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps (L, C) that are `fractions` of each channel's spread over `latents` (each (C, h, w)), and
    the channels' means as the offset: levels for a latent space that is not learned (the `sd` model's)."""
    flat = torch.cat([z.flatten(1) for z in latents], 1).double()
    steps = torch.tensor(list(fractions), dtype=torch.float64)[:, None] * flat.std(1)[None]
    return steps.float(), flat.mean(1).float()


def export_levels(levels: QualityLevels, steps: torch.Tensor, latents: Iterable[torch.Tensor]) -> QualityLevels:
    """Fix `steps` and fit each level's integer tables to the codes of `latents` (each (C, h, w))."""
    levels.steps.copy_(steps)
    latents = list(latents)
    for level in range(1, levels.count + 1):
        counts = sum(entropy.symbol_counts(levels.codes(z, level).numpy()) for z in latents)
        levels.tables[level - 1] = torch.from_numpy(entropy.fit_tables(counts).astype(np.int64))
    levels.__dict__.pop("_coders", None)
    return levels
