"""A plain, per-output-channel DynamicConv: the reference the vectorized layer is tested against.

It rebuilds, for each output channel, the paper's predictor from ordinary modules
(HybridDense -> BatchNorm1d -> HybridDense -> BatchNorm1d -> Linear) with the weights of
that channel, and loops over the channels. Its HybridDense is the literal formula, not the
library's layer, so the comparison also checks the library's hand-written activation. It is
slow on purpose: it is the readable statement of what the layer computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_codec.layers import POWER_RANGE, DynamicConv, HybridDense


class PlainHybridDense(nn.Module):
    """HybridDense written as the paper's formula, sharing no code with the library's layer."""

    def __init__(self, source: HybridDense, channel: int) -> None:
        super().__init__()
        self.eps = source.eps
        for name in ("weight", "bias", "power", "scale"):  # shapes (1, out, in) and (1, out), as groups=1
            setattr(self, name, nn.Parameter(getattr(source, name).data[channel : channel + 1].clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = x @ self.weight[0].T + self.bias[0]
        y = self.scale[0] * (F.relu(lin) + self.eps) ** self.power[0].clamp(*POWER_RANGE)
        return torch.nan_to_num(torch.copysign(y, lin), nan=0.0)


def _dense(source: HybridDense, channel: int) -> PlainHybridDense:
    return PlainHybridDense(source, channel)


def _norm(source: nn.BatchNorm1d, channel: int, features: int) -> nn.BatchNorm1d:
    norm = nn.BatchNorm1d(features, eps=source.eps, momentum=source.momentum, dtype=source.weight.dtype)
    part = slice(channel * features, (channel + 1) * features)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(norm, name).data.copy_(getattr(source, name).data[part])
    norm.train(source.training)
    return norm


def predictors(layer: DynamicConv) -> list[nn.Sequential]:
    """One ordinary MLP per output channel, holding that channel's weights."""
    mlps = []
    for o in range(layer.out_channels):
        # every module is built in the layer's dtype before the copy: copying float64 weights into a
        # float32 module first would round them, and the float64 comparison would only hold to 1e-6 relative
        kernel = nn.Linear(layer.hidden, layer.patch_size, dtype=layer.kernel_weight.dtype)
        kernel.weight.data.copy_(layer.kernel_weight.data[o])
        kernel.bias.data.copy_(layer.kernel_bias.data[o])
        mlps.append(
            nn.Sequential(
                _dense(layer.dense1, o),
                _norm(layer.norm1, o, layer.hidden),
                _dense(layer.dense2, o),
                _norm(layer.norm2, o, layer.hidden),
                kernel,
            ).to(layer.kernel_weight.dtype)
        )
    return mlps


def loop_dynamic_conv(layer: DynamicConv, x: torch.Tensor, mlps: list[nn.Sequential] | None = None) -> torch.Tensor:
    """What `layer(x)` computes, one output channel at a time."""
    mlps = predictors(layer) if mlps is None else mlps
    batch, _, height, width = x.shape
    out_h, out_w = layer.output_size(height, width)
    patches = F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride)  # (B, P, L)
    patches = patches.transpose(1, 2).reshape(-1, layer.patch_size)
    channels = []
    for mlp in mlps:
        kernels = mlp(patches)  # (N, P): one kernel per patch
        channels.append((patches * kernels).mean(dim=1))
    dynamic = torch.stack(channels, dim=1).view(batch, out_h, out_w, layer.out_channels).permute(0, 3, 1, 2)
    return dynamic + layer.similar_conv(x)
