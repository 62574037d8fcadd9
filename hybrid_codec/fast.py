"""Fast inference: a trained DynamicConv turned into a fixed plan for the codec. Only `codec.py` uses it.

The plain layer (`layers.py`) builds every predicted kernel. Here the same function is computed
from the frozen parameters with the algebra that avoids it:

    mean_p patch_p * (W_o hidden_o + b_o)_p = (hidden_o . (patch W_o) + patch . b_o) / P

so everything linear in the patch (dense1, the kernel projection, the kernel bias, similar_conv)
is one matrix product, both eval-mode BatchNorms are folded into the weights after them, and the
columns of that matrix follow the input: scaled by 1/255 for 8-bit images and ordered (ky, kx, c)
for channels-last image arrays, which are read in memory order without a copy.

The compiled kernel (`_fast.c`, built with the package where a C compiler is present) does the
product and, in the same pass, what PyTorch does in about twenty after it: both activations, the
second dense layer and the kernel products, one output channel and 64 patches at a time (the rows
of `grouped_weights`), so the product's output never leaves the L1 cache. For 8-bit images it does
the product on 16-bit integer weights straight from the pixels. It has one variant per instruction
set, the best the CPU runs chosen at each call (`kernel_variant`): `avx512`, `avx2` (AVX2 + FMA),
`portable` (plain C, vectorized by the compiler: NEON on ARM64). Elsewhere (no kernel, other
devices, float64) PyTorch runs the same steps. `HYBRID_CODEC_KERNEL=0` turns the kernel off; a
variant's name (`avx2`, `portable`) takes at most that one, which is how the tests run every
variant a CPU has.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CodecError
from .layers import POWER_RANGE, DynamicConv, hybrid_activation

try:
    from . import _fast
except ImportError:  # built without a C compiler: PyTorch does the work
    _fast = None

BLOCK = 64
"""Patches per kernel task (four AVX-512 vectors, eight AVX2 ones); the kernel takes a multiple of it."""

PYTORCH_CHUNK_VALUES = 2**21
"""Hidden values per chunk of patches on the PyTorch path: a chunk's intermediates stay in the
CPU's caches, and memory stays bounded however large the image."""


KERNEL_VARIANTS = ("avx512", "avx2", "portable")
"""The compiled kernel's variants, best first; `_fast.VARIANTS` lists those this CPU runs."""


def kernel_variant() -> str | None:
    """The kernel variant that serves: the best this CPU runs, at most the one HYBRID_CODEC_KERNEL
    names (`avx512`, `avx2`, `portable`; `0` for none, unset or `1` for the best); None where the
    kernel was not built or is switched off, and PyTorch runs alone."""
    setting = os.environ.get("HYBRID_CODEC_KERNEL", "1").strip().lower()
    if setting == "0" or _fast is None:
        return None
    if setting in ("", "1"):
        return _fast.VARIANTS[0]
    if setting not in KERNEL_VARIANTS:
        raise CodecError(f"HYBRID_CODEC_KERNEL={setting!r}: use 0, 1 or one of {', '.join(KERNEL_VARIANTS)}")
    allowed = KERNEL_VARIANTS[KERNEL_VARIANTS.index(setting) :]
    return next(v for v in _fast.VARIANTS if v in allowed)  # `portable` runs everywhere


def kernel_description() -> str:
    """Which kernel variant serves and why, in words (for `hybrid-codec info` and the benchmarks)."""
    if _fast is None:
        return "none: the kernel was not built (no C compiler at install); PyTorch runs alone"
    variant = kernel_variant()
    if variant is None:
        return "none: HYBRID_CODEC_KERNEL=0; PyTorch runs alone"
    vnni = " with VNNI" if variant == "avx512" and _fast.VNNI else ""
    threads = "" if _fast.OPENMP else " (built without OpenMP: used on one thread only)"
    return f"{variant}{vnni}{threads}; this CPU runs {', '.join(_fast.VARIANTS)}"


def kernel_available() -> bool:
    """Whether the kernel was built and HYBRID_CODEC_KERNEL does not switch it off."""
    return kernel_variant() is not None


@dataclass
class FoldedWeights:
    """One input layout's weights: the (2*O*H + 2*O, P + 1) matrix of everything linear in the patch
    (rows: dense1 before its activation, patch . W_o, patch . b_o, similar_conv; last column: the
    biases, against the patches' constant 1), dense2 with norm1 folded in, and the kernel's
    layouts of `linear`: grouped by output channel, and rounded to integers for 8-bit pixels."""

    linear: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    grouped: torch.Tensor | None = field(default=None, repr=False)
    integers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)


class FastDynamicConv:
    """What `layer(x)` gives in eval mode, for weights that no longer change.

    The parameters are read once, at construction: later changes to the layer are not seen.
    """

    def __init__(self, layer: DynamicConv) -> None:
        if layer.training:
            raise ValueError("FastDynamicConv takes a layer in eval mode")
        self.layer = layer
        self.out_channels, self.hidden, self.patch_size = layer.out_channels, layer.hidden, layer.patch_size
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
        with torch.no_grad():
            self._channel_first = self._fold_batchnorm()
            # (power, scale) of both activations, copied: the plan must not see later edits of the layer
            self._activations = [
                (d.power[..., None].clone(), d.scale[..., None].clone()) for d in (layer.dense1, layer.dense2)
            ]
            self._kernel_parameters = self._kernel_parameters_of(  # None: a zero scale, PyTorch runs it
                *self._channel_first[1:]
            )
        self._layouts: dict[tuple[bool, float], FoldedWeights] = {}

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.layer.output_size(height, width)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, input_scale: float = 1.0) -> torch.Tensor:
        """(B, C, H, W) -> (B, O, H', W') of `layer(x * input_scale)`; x may be 8-bit."""
        batch, _, height, width = x.shape
        out_h, out_w = self.output_size(height, width)
        channels_last = self.reads_channels_last(x)
        weights = self.weights(channels_last, input_scale)
        out = None
        if self._kernel_parameters is not None and self.kernel_takes_pixels(x):
            out = self._kernel_from_pixels(x, weights)
        if out is None:
            patches = self.patches(x, channels_last, weights.linear.dtype)
            if self._kernel_parameters is not None and self.kernel_takes_patches(patches):
                out = self._kernel_from_patches(patches, weights)
            else:
                chunk = max(1, PYTORCH_CHUNK_VALUES // (self.out_channels * self.hidden))
                out = torch.cat([self._dynamic(part, weights) for part in patches.split(chunk)], dim=1)
        return out.view(self.out_channels, batch, out_h, out_w).transpose(0, 1)

    # ------------------------------------------------------------------ the weights, per input layout

    def weights(self, channels_last: bool, input_scale: float) -> FoldedWeights:
        """The folded weights for one input layout (see `reads_channels_last`), made once and kept."""
        key = (channels_last, input_scale)
        if key not in self._layouts:
            linear, w2, b2 = self._channel_first
            with torch.no_grad():
                linear = self._reorder_columns(linear, channels_last, input_scale)
                self._layouts[key] = FoldedWeights(linear, w2, b2)
        return self._layouts[key]

    def _fold_batchnorm(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The linear matrix for channel-first patches, and dense2's weights, with both BatchNorms folded in."""
        layer = self.layer
        o, h, p = layer.out_channels, layer.hidden, layer.patch_size
        projection = layer.kernel_weight.transpose(1, 2)  # (O, H, P)
        gain1, shift1 = (t.view(o, 1, h) for t in layer.norm1.scale_and_shift())
        gain2, shift2 = (t.view(o, h, 1) for t in layer.norm2.scale_and_shift())
        w2, b2 = layer.dense2.weight * gain1, layer.dense2.bias + (layer.dense2.weight * shift1).sum(-1)
        kernel_bias = layer.kernel_bias + (projection * shift2).sum(1)
        projection = projection * gain2
        weight = torch.cat(
            [
                layer.dense1.weight.reshape(o * h, p),
                projection.reshape(o * h, p),
                kernel_bias,
                layer.similar_conv.weight.reshape(o, p),
            ]
        )
        bias = torch.cat([layer.dense1.bias.reshape(-1), weight.new_zeros(o * h + o), layer.similar_conv.bias])
        return torch.cat([weight, bias[:, None]], dim=1), w2, b2[..., None]

    def _reorder_columns(self, linear: torch.Tensor, channels_last: bool, input_scale: float) -> torch.Tensor:
        """The columns ordered (ky, kx, c) for channels-last input, and scaled by what the input is multiplied by."""
        if channels_last:
            c, k = self.layer.in_channels, self.kernel_size
            order = torch.arange(self.patch_size, device=linear.device).view(c, k, k).permute(1, 2, 0).flatten()
            linear = linear[:, torch.cat([order, order.new_tensor([self.patch_size])])]
        if input_scale != 1.0:
            linear = torch.cat([linear[:, :-1] * input_scale, linear[:, -1:]], dim=1)
        return linear

    def _kernel_parameters_of(self, w2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Powers (clamped), log2 |scale| and dense2's folded weights as contiguous float32, per (o, h);
        None if a scale is 0 (0 * inf is NaN for the kernel, 0 for PyTorch: PyTorch runs that layer)."""
        o, h = self.out_channels, self.hidden
        d1, d2 = self.layer.dense1, self.layer.dense2
        p1, p2 = (d.power.reshape(o, h).clamp(*POWER_RANGE) for d in (d1, d2))
        s1, s2 = (d.scale.reshape(o, h).abs().log2() for d in (d1, d2))
        if not bool(s1.isfinite().all() and s2.isfinite().all()):  # log2 0 = -inf
            return None
        return tuple(t.float().contiguous() for t in (p1, s1, w2, b2, p2, s2))

    # ------------------------------------------------------------------ the patches

    def reads_channels_last(self, x: torch.Tensor) -> bool:
        """Whether x's windows are read in memory order: non-overlapping windows of a channels-last x,
        such as an HxWx3 image array seen as (1, 3, H, W)."""
        return (
            self.kernel_size == self.stride
            and self.padding == 0
            and x.shape[1] > 1
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        )

    def patches(self, x: torch.Tensor, channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
        """(B, C, H, W) -> (B * L, P + 1): every window and a constant 1 that the biases multiply.
        One copy: no im2col buffer, no padding pass. Channel-first windows in `F.unfold` order, or
        (ky, kx, c) for `channels_last`, the order they lie in memory (whole rows of k * C values)."""
        batch, channels, height, width = x.shape
        k, p = self.kernel_size, self.patch_size
        out_h, out_w = self.output_size(height, width)
        out = x.new_empty(batch * out_h * out_w, p + 1, dtype=dtype)
        out[:, p] = 1.0
        if channels_last:
            pixels = x.permute(0, 2, 3, 1).to(dtype)[:, : out_h * k, : out_w * k]  # (B, H, W, C)
            windows = pixels.reshape(batch, out_h, k, out_w, k * channels).transpose(2, 3)
            out[:, :p].view(batch, out_h, out_w, k, k * channels).copy_(windows)
        elif k == self.stride and self.padding == 0:  # non-overlapping windows: a strided view
            windows = x[:, :, : out_h * k, : out_w * k].reshape(batch, channels, out_h, k, out_w, k)
            out[:, :p].view(batch, out_h, out_w, channels, k, k).copy_(windows.permute(0, 2, 4, 1, 3, 5))
        else:
            windows = torch.nn.functional.unfold(x.to(dtype), k, padding=self.padding, stride=self.stride)
            out[:, :p].view(batch, -1, p).copy_(windows.transpose(1, 2))
        return out

    # ------------------------------------------------------------------ PyTorch after the product

    def _dynamic(self, patches: torch.Tensor, weights: FoldedWeights) -> torch.Tensor:
        """(N, P + 1) patches -> (O, N): kernel products plus similar_conv, channel-first (O, H, N) so
        that each step is one contiguous batched matrix product or elementwise pass."""
        o, h, p = self.out_channels, self.hidden, self.patch_size
        (power1, scale1), (power2, scale2) = self._activations
        eps1, eps2 = self.layer.dense1.eps, self.layer.dense2.eps
        linear = weights.linear @ patches.T  # (2*O*H + 2*O, N)
        lin1, projected = linear[: o * h].view(o, h, -1), linear[o * h : 2 * o * h].view(o, h, -1)
        kernel_bias_part, similar = linear[2 * o * h : 2 * o * h + o], linear[2 * o * h + o :]
        hidden = hybrid_activation(lin1, power1, scale1, eps1)  # (O, H, N)
        lin2 = torch.baddbmm(weights.b2, weights.w2, hidden)
        hidden = hybrid_activation(lin2, power2, scale2, eps2)
        return (hidden.mul_(projected).sum(1) + kernel_bias_part) / p + similar

    # ------------------------------------------------------------------ the compiled kernel

    def _kernel_can_run(self, x: torch.Tensor) -> bool:
        layer = self.layer
        return (
            kernel_available()
            and x.device.type == "cpu"
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting()
            and layer.hidden <= _fast.MAX_HIDDEN
            and min(layer.dense1.eps, layer.dense2.eps) > 0
            and (_fast.OPENMP or torch.get_num_threads() == 1)  # a one-thread kernel would lose to PyTorch
        )

    def kernel_takes_patches(self, patches: torch.Tensor) -> bool:
        """Whether the kernel runs after the product: float32 patches on the CPU."""
        return patches.dtype == torch.float32 and self._kernel_can_run(patches)

    def kernel_takes_pixels(self, x: torch.Tensor) -> bool:
        """Whether the kernel reads x itself: 8-bit channels-last images (B, C, H, W) through
        non-overlapping windows whose rows are whole 4-byte words."""
        k = self.kernel_size
        return (
            x.dtype == torch.uint8
            and self.stride == k
            and self.padding == 0
            and k * x.shape[1] % 4 == 0
            and x.shape[2] >= k
            and x.shape[3] >= k
            and x.numel() < 2**31
            and self.reads_channels_last(x)
            and self._kernel_can_run(x)
        )

    def _arguments(self, parameters: tuple[torch.Tensor, ...]) -> tuple:
        """What both kernel entry points take last: the activations, dense2 and 1 / P, and the threads."""
        p1, s1, w2, b2, p2, s2 = parameters
        eps1, eps2 = self.layer.dense1.eps, self.layer.dense2.eps
        pointers = [t.data_ptr() for t in (p1, s1, w2, b2, p2, s2)]
        return (*pointers[:2], eps1, *pointers[2:], eps2, 1.0 / self.patch_size, torch.get_num_threads())

    def _kernel_from_patches(self, patches: torch.Tensor, weights: FoldedWeights) -> torch.Tensor:
        """The whole layer from float patches, the product done by the kernel too, per output
        channel and block of patches (see `grouped_weights`)."""
        if weights.grouped is None:
            weights.grouped = grouped_weights(weights.linear, self.out_channels, self.hidden)
        total, k = patches.shape
        blocks = -(-total // BLOCK)  # the kernel takes whole blocks, each transposed: (blocks, k, BLOCK)
        if total % BLOCK:
            patches = torch.cat([patches, patches.new_zeros(blocks * BLOCK - total, k)])
        transposed = patches.new_empty(blocks, k, BLOCK)
        transposed.transpose(1, 2).copy_(patches.view(blocks, BLOCK, k))
        out = patches.new_empty(self.out_channels, blocks * BLOCK)
        _fast.dynamic_from_patches(
            kernel_variant(),
            transposed.data_ptr(),
            k,
            blocks * BLOCK,
            weights.grouped.data_ptr(),
            weights.grouped.shape[1],
            out.data_ptr(),
            out.stride(0),
            self.out_channels,
            self.hidden,
            *self._arguments(self._kernel_parameters),
        )
        return out[:, :total]

    def _kernel_from_pixels(self, x: torch.Tensor, weights: FoldedWeights) -> torch.Tensor:
        """The whole layer from 8-bit pixels, the product on 16-bit integers (see `integer_weights`):
        AVX-512 VNNI where the CPU has it, else a 16-bit multiply-add (AVX-512, AVX2 or plain C),
        every variant with identical sums."""
        if weights.integers is None:
            weights.integers = integer_weights(weights.linear)
        packed, row_scale, row_bias = weights.integers
        batch, channels, height, width = x.shape
        out_h, out_w = self.output_size(height, width)
        total = batch * out_h * out_w
        out = torch.empty(self.out_channels, total + -total % BLOCK)
        _fast.dynamic_from_pixels(
            kernel_variant(),
            x.data_ptr(),
            batch,
            height,
            width,
            channels,
            self.kernel_size,
            packed.data_ptr(),
            row_scale.data_ptr(),
            row_bias.data_ptr(),
            weights.linear.shape[0],
            out.data_ptr(),
            out.stride(0),
            self.out_channels,
            self.hidden,
            *self._arguments(self._kernel_parameters),
            bool(_fast.VNNI),
        )
        return out[:, :total]


def grouped_weights(linear: torch.Tensor, channels: int, hidden: int) -> torch.Tensor:
    """The linear matrix (R, P + 1) as the float kernel reads it, (O, tiles, P + 1, TILE): per output
    channel o its rows lin1, proj, kb and similar (2H + 2), zero-padded to whole tiles of TILE rows,
    each tile's column of TILE values contiguous."""
    o, h, columns = channels, hidden, linear.shape[1]
    lin1, proj, kernel_bias, similar = linear.float().split([o * h, o * h, o, o])
    tiles = -(-(2 * h + 2) // _fast.TILE)
    padding = linear.new_zeros(o, tiles * _fast.TILE - (2 * h + 2), columns, dtype=torch.float32)
    parts = (lin1.view(o, h, columns), proj.view(o, h, columns), kernel_bias[:, None], similar[:, None], padding)
    return torch.cat(parts, 1).view(o, tiles, _fast.TILE, columns).transpose(2, 3).contiguous()


def integer_weights(linear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear matrix (R, P + 1) as the pixel kernel reads it: the first P columns rounded to
    16-bit integers per row (row * row_scale), packed as the kernel's pairs; the biases stay float.

    Rounding is the only difference from float32: a relative 1e-5 per product. The integers are
    kept small enough that no 32-bit sum of P 8-bit pixels times them can overflow.
    """
    rows, p = linear.shape[0], linear.shape[1] - 1
    largest = min(2**15 - 1, (2**31 - 1) // (255 * p))
    body = linear[:, :p].double()
    row_scale = body.abs().amax(1) / largest
    row_scale = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
    integers = (body / row_scale[:, None]).round().clamp(-largest, largest).to(torch.int16)
    tiles = -(-rows // _fast.TILE)
    integers = torch.cat([integers, integers.new_zeros(tiles * _fast.TILE - rows, p)])
    # each 4 values (w0, w1, w2, w3) become the pairs (w0, w2), (w1, w3), as the kernel reads the pixels
    pairs = integers.view(-1, p // 4, 2, 2).transpose(-1, -2).contiguous().view(torch.int32).view(-1, p // 2)
    packed = pairs.view(tiles, _fast.TILE, p // 2).transpose(1, 2).contiguous()
    return packed, row_scale.float().contiguous(), linear[:, p].float().contiguous()


def kernel_activation(
    lin: torch.Tensor, power: float, scale: float, eps: float, variant: str | None = None
) -> torch.Tensor:
    """The kernel's HybridDense activation of a float32 CPU tensor, one power and (non-zero) scale for
    all, by `variant` (default: the one that serves, `kernel_variant`)."""
    if scale == 0:
        raise ValueError("the kernel takes non-zero scales only (the layer falls back to PyTorch for 0)")
    flat = lin.detach().to("cpu", torch.float32).reshape(-1)
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % BLOCK)])
    out = torch.empty_like(padded)
    power = min(max(power, POWER_RANGE[0]), POWER_RANGE[1])
    variant = variant or kernel_variant() or _fast.VARIANTS[0]
    _fast.activation(variant, padded.data_ptr(), out.data_ptr(), padded.numel(), power, math.log2(abs(scale)), eps)
    return out[: flat.numel()].view_as(lin)


class FastAutoencoder:
    """An Autoencoder's encoder and decoder as fast plans: images (float, or 8-bit as read) -> latents -> images."""

    def __init__(self, model: nn.Module) -> None:
        self.encoder = FastDynamicConv(model.encoder.conv)
        self.decoder = FastDynamicConv(model.decoder.conv)
        self.shuffle = model.decoder.shuffle

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H and W multiples of 8, float in [0, 1] or uint8 -> latents (B, 4, H/8, W/8)."""
        return self.encoder(images, 1 / 255) if images.dtype == torch.uint8 else self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.decoder(latents)).clamp(0, 1)

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> 8-bit images (B, 8h, 8w, 3), channels-last as image arrays are:
        `decode`'s pixel shuffle, clamp and rounding to 8 bits in place, then two copies of bytes."""
        out = self.decoder(latents).transpose(0, 1)  # (O, B, h, w): the decoder's own, contiguous output
        batch, (height, width), factor = latents.shape[0], latents.shape[2:], self.shuffle.upscale_factor
        channels = out.shape[0] // factor**2
        values = out.view(channels, factor, factor, batch, height, width).clamp_(0, 1).mul_(255).round_()
        # (c, dy, dx, B, y, x) -> (B, y, dy, x, dx, c), output pixel (y * f + dy, x * f + dx): two copies
        # of bytes are twice as fast as one copy of scattered floats
        grouped = values.to(torch.uint8).permute(3, 1, 2, 0, 4, 5).contiguous()  # (B, dy, dx, c, y, x)
        pixels = grouped.permute(0, 4, 1, 5, 2, 3).contiguous()
        return pixels.view(batch, height * factor, width * factor, channels)
