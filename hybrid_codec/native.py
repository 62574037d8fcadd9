"""The compiled CPU kernel for DynamicConv's inference forward, and when it runs.

`_native.c` does in one pass over the patches what PyTorch does in about twenty: both HybridDense
activations, the second dense layer and the kernel products (`mix`, see its top comment). For
8-bit images (the encoder reading an image file) it also does the matrix product before them,
on 16-bit integers straight from the pixels (`pixel_mix`). It is built with the package where a
C compiler is present, and runs on x86-64 CPUs with AVX-512. It serves CPU inference only:
training, float64, other devices, tracing and export (ONNX, `torch.compile`) take the PyTorch
path, which is also the reference the tests hold it to. `HYBRID_CODEC_NATIVE=0` in the
environment turns it off.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch

try:
    from . import _native
except ImportError:  # built without a C compiler: PyTorch does the work
    _native = None

if TYPE_CHECKING:
    from .layers import DynamicConv

BLOCK = 64
"""Patches per kernel task (four AVX-512 vectors); the kernel takes a multiple of it."""

CHUNK_VALUES = 2**20
"""Values of the matrix product's output per chunk of patches (4 MB, about 128 patches for the
decoder, the whole image for the encoder): the kernel reads it while it is still in the CPU's
cache. Measured on the 2-core test machine, 128-patch chunks decode 15-20% faster than 512."""


def available() -> bool:
    """Whether the kernel was built, this CPU has AVX-512, and HYBRID_CODEC_NATIVE is not 0."""
    return _native is not None and bool(_native.AVX512) and os.environ.get("HYBRID_CODEC_NATIVE", "1") != "0"


def serves(layer: DynamicConv, patches: torch.Tensor) -> bool:
    """Whether `mix` runs this forward: float32 CPU inference, nothing recording the graph."""
    return patches.dtype == torch.float32 and _inference(layer, patches)


def serves_pixels(layer: DynamicConv, x: torch.Tensor) -> bool:
    """Whether `pixel_mix` runs this forward: 8-bit channels-last images (B, C, H, W) through
    non-overlapping windows whose rows are whole 4-byte words."""
    k = layer.kernel_size
    return (
        x.dtype == torch.uint8
        and layer.stride == k
        and layer.padding == 0
        and k * x.shape[1] % 4 == 0
        and x.shape[2] >= k
        and x.shape[3] >= k
        and x.numel() < 2**31
        and layer.reads_channels_last(x)
        and _inference(layer, x)
    )


def _inference(layer: DynamicConv, x: torch.Tensor) -> bool:
    return (
        available()
        and not layer.training
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and layer.hidden <= _native.MAX_HIDDEN
        and min(layer.dense1.eps, layer.dense2.eps) > 0
        and (_native.OPENMP or torch.get_num_threads() == 1)  # a one-thread kernel would lose to PyTorch
    )


def mix(
    layer: DynamicConv, patches: torch.Tensor, weight: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """What `layer.mix` gives in eval mode, for all (N, P + 1) patches at once -> (O, N); None for
    a layer with a zero scale (0 * inf is NaN for the kernel, 0 for PyTorch: PyTorch runs it).

    `weight`, `w2`, `b2` are `layer.fused_weights()`, with both BatchNorms folded in.
    """
    o, h = layer.out_channels, layer.hidden
    if weight.shape != (2 * o * h + 2 * o, patches.shape[1]) or w2.shape != (o, h, h) or b2.numel() != o * h:
        raise ValueError(f"native.mix: weights {tuple(weight.shape)}, {tuple(w2.shape)} do not fit the layer")
    parameters = kernel_parameters(layer, w2, b2)
    if parameters is None:
        return None
    total = patches.shape[0]
    chunk = max(1, round(CHUNK_VALUES / weight.shape[0] / BLOCK)) * BLOCK
    out = patches.new_empty(o, total + -total % BLOCK)
    for start in range(0, total, chunk):
        part = patches[start : start + chunk]
        if part.shape[0] % BLOCK:  # the kernel takes whole blocks: the last one is padded, its extra rows dropped
            part = torch.cat([part, part.new_zeros(-part.shape[0] % BLOCK, part.shape[1])])
        linear = (weight @ part.T).contiguous()  # (2*O*H + 2*O, n), rows in the order the kernel reads
        _native.mix(
            linear.data_ptr(),
            out[:, start:].data_ptr(),
            out.stride(0),
            o,
            h,
            part.shape[0],
            *layer_arguments(layer, parameters),
        )
    return out[:, :total]


def pixel_mix(
    layer: DynamicConv,
    x: torch.Tensor,
    weight: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    use_vnni: bool = True,
) -> torch.Tensor | None:
    """`mix` straight from 8-bit channels-last images x (B, C, H, W) -> (O, N), the matrix product
    included; None for a layer with a zero scale. `weight` is `layer.fused_weights(True, scale)`.

    The product runs on 16-bit integers (see `pixel_weights`): AVX-512 VNNI where the CPU has it
    and `use_vnni`, else AVX-512's multiply-add, with identical sums.
    """
    o, h = layer.out_channels, layer.hidden
    parameters = kernel_parameters(layer, w2, b2)
    if parameters is None:
        return None
    packed, row_scale, row_bias = pixel_weights(layer, weight)
    batch, channels, height, width = x.shape
    out_h, out_w = layer.output_size(height, width)
    total = batch * out_h * out_w
    out = torch.empty(o, total + -total % BLOCK)
    _native.pixel_mix(
        x.data_ptr(),
        batch,
        height,
        width,
        channels,
        layer.kernel_size,
        packed.data_ptr(),
        row_scale.data_ptr(),
        row_bias.data_ptr(),
        weight.shape[0],
        out.data_ptr(),
        out.stride(0),
        o,
        h,
        *layer_arguments(layer, parameters),
        use_vnni,
    )
    return out[:, :total]


def layer_arguments(layer: DynamicConv, parameters: tuple[torch.Tensor, ...]) -> tuple:
    """What both kernels take last: the activations, dense2 and 1 / P of the layer, and the threads."""
    p1, s1, w2, b2, p2, s2 = parameters
    eps1, eps2 = layer.dense1.eps, layer.dense2.eps
    pointers = [t.data_ptr() for t in (p1, s1, w2, b2, p2, s2)]
    return (*pointers[:2], eps1, *pointers[2:], eps2, 1.0 / layer.patch_size, torch.get_num_threads())


def pixel_weights(layer: DynamicConv, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weight` (R, P + 1) as `pixel_mix` reads it: the first P columns rounded to 16-bit integers
    per row (row * row_scale), packed as the kernel's pairs; the last column (the biases) stays float.

    Rounding is the only difference from float32: a relative 1e-5 per product. The integers are
    kept small enough that no 32-bit sum of P 8-bit pixels times them can overflow. Kept on the
    layer while `weight` is the same tensor, like `kernel_parameters`.
    """
    kept = getattr(layer, "_pixel_weights", None)
    if kept is not None and kept[0] is weight:
        return kept[1]
    rows, p = weight.shape[0], weight.shape[1] - 1
    largest = min(2**15 - 1, (2**31 - 1) // (255 * p))
    body = weight[:, :p].double()
    row_scale = body.abs().amax(1) / largest
    row_scale = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
    integers = (body / row_scale[:, None]).round().clamp(-largest, largest).to(torch.int16)
    tiles = -(-rows // _native.TILE)
    integers = torch.cat([integers, integers.new_zeros(tiles * _native.TILE - rows, p)])
    # each 4 values (w0, w1, w2, w3) become the pairs (w0, w2), (w1, w3), as the kernel reads the pixels
    pairs = integers.view(-1, p // 4, 2, 2).transpose(-1, -2).contiguous().view(torch.int32).view(-1, p // 2)
    packed = pairs.view(tiles, _native.TILE, p // 2).transpose(1, 2).contiguous()
    prepared = (packed, row_scale.float().contiguous(), weight[:, p].float().contiguous())
    layer._pixel_weights = (weight, prepared)
    return prepared


def kernel_parameters(layer: DynamicConv, w2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Powers (clamped), log2 |scale| and dense2's folded weights as contiguous float32, per (o, h);
    None if a scale is 0.

    Kept on the layer while `w2` is the same tensor, as it is for a frozen layer (see
    `DynamicConv.freeze`): about ten small operations that cost 0.1 ms a call otherwise.
    """
    from .layers import POWER_RANGE  # not at the top: layers imports this module

    kept = getattr(layer, "_kernel_parameters", None)
    if kept is not None and kept[0] is w2 and kept[1] is b2:
        return kept[2]
    o, h = layer.out_channels, layer.hidden
    d1, d2 = layer.dense1, layer.dense2
    p1, p2 = (d.power.reshape(o, h).clamp(*POWER_RANGE) for d in (d1, d2))
    s1, s2 = (d.scale.reshape(o, h).abs().log2() for d in (d1, d2))
    finite = bool(s1.isfinite().all() and s2.isfinite().all())  # log2 0 = -inf
    parameters = tuple(t.float().contiguous() for t in (p1, s1, w2, b2, p2, s2)) if finite else None
    layer._kernel_parameters = (w2, b2, parameters)
    return parameters


def activation(lin: torch.Tensor, power: float, scale: float, eps: float) -> torch.Tensor:
    """The kernel's HybridDense activation of a float32 CPU tensor, one power and (non-zero) scale for all."""
    from .layers import POWER_RANGE

    if scale == 0:
        raise ValueError("the kernel takes non-zero scales only (the layer falls back to PyTorch for 0)")
    flat = lin.detach().to("cpu", torch.float32).reshape(-1)
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % BLOCK)])
    out = torch.empty_like(padded)
    power = min(max(power, POWER_RANGE[0]), POWER_RANGE[1])
    _native.activation(padded.data_ptr(), out.data_ptr(), padded.numel(), power, math.log2(abs(scale)), eps)
    return out[: flat.numel()].view_as(lin)
