"""8-bit latent quantization, shared by latent files and quantization-aware training.

Each channel of each image is mapped linearly from its [min, max] onto the integers
0..255; the file keeps min and step per channel to map back.
"""

from __future__ import annotations

import torch

LEVELS = 256


def quantize(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C, h, w) float -> uint8 codes, and per (image, channel) offset and step, each (B, C)."""
    flat = latent.detach().flatten(2).float()
    low, high = torch.aminmax(flat, dim=-1)
    step = (high - low) / (LEVELS - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((flat - low[..., None]) / step[..., None]).round_().clamp_(0, LEVELS - 1)
    return codes.to(torch.uint8).view(latent.shape), low, step


def dequantize(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize`, up to half a step."""
    return codes.float() * step[..., None, None] + low[..., None, None]


def fake_quantize(latent: torch.Tensor) -> torch.Tensor:
    """What the decoder will see after an 8-bit round trip, with a straight-through gradient."""
    restored = dequantize(*quantize(latent)).to(latent.dtype)
    return latent + (restored - latent).detach()
