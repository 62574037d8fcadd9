"""The two layers of "Mind Your Own Kernels": HybridDense and DynamicConv.

DynamicConv predicts, for every patch, one kernel per output channel with a small
HybridDense MLP, and takes the patch . kernel product; an ordinary Conv2d with the same
geometry ("similar_conv") learns what all patches share. All predictors of a layer run
as batched matrix products: there is no Python loop over output channels or patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import native

EVAL_CHUNK_VALUES = 2**21
"""Hidden values per chunk of patches in eval mode (about 500 patches for the decoder, the whole
image for the encoder). A chunk's intermediates, about 8 MB each, stay in the CPU's caches, which
decodes about 15% faster than one pass over the whole image, and memory stays bounded however
large the image."""

POWER_RANGE = (0.25, 4.0)
"""The learned power is clamped to this range so that `(relu + eps) ** power` stays finite."""


def hybrid_activation(lin: torch.Tensor, power: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """`copysign(scale * (relu(lin) + eps) ** power, lin)` with NaNs zeroed; power clamped to POWER_RANGE."""
    power = power.clamp(*POWER_RANGE)
    if torch.is_grad_enabled() and (lin.requires_grad or power.requires_grad or scale.requires_grad):
        return _HybridActivation.apply(lin, power, scale, eps)
    return _finish(_lift(lin, power, eps), lin, scale)


def _lift(lin: torch.Tensor, power: torch.Tensor, eps: float) -> torch.Tensor:
    return lin.clamp_min(0).add_(eps).log_().mul_(power).exp_()  # (relu(lin) + eps) ** power, one new tensor


def _finish(lifted: torch.Tensor, lin: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return lifted.mul_(scale).copysign_(lin).nan_to_num_(nan=0.0)  # in place


class _HybridActivation(torch.autograd.Function):
    """The activation with a hand-written backward.

    Autograd's version of pow / copysign / nan_to_num keeps several full-size temporaries
    and takes about three times as long; this one keeps `lin` and `base ** power` only.
    """

    @staticmethod
    def forward(ctx, lin: torch.Tensor, power: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        lifted = _lift(lin, power, eps)
        ctx.save_for_backward(lin, power, scale, lifted)
        ctx.eps = eps
        return _finish(lifted.clone(), lin, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lin, power, scale, lifted = ctx.saved_tensors
        base = lin.clamp_min(0).add_(ctx.eps)
        signed = lifted.copysign(lin)  # y / scale
        grad_signed = (grad * signed).nan_to_num_(nan=0.0)
        # copysign keeps only |scale|: y = |scale| * base ** power * sign(lin)
        grad_scale = grad_signed.sum_to_size(scale.shape) * scale.sign() if ctx.needs_input_grad[2] else None
        grad_power = None
        if ctx.needs_input_grad[1]:
            grad_power = (grad_signed * base.log()).sum_to_size(power.shape) * scale.abs()
        # d/dlin = |scale| * power * base ** (power - 1) where lin > 0, else 0
        grad_lin = (grad * lifted).div_(base).mul_(scale.abs() * power).mul_(lin > 0)
        return grad_lin, grad_power, grad_scale, None


class HybridDense(nn.Module):
    """A dense layer whose activation raises the ReLU'd output to a learned power.

    `groups` independent layers run together: the input is (..., groups, in_features), or
    (..., 1, in_features) when all groups read the same input, and the output is
    (..., groups, out_features). With groups=1 a plain (..., in_features) input works too.
    """

    def __init__(self, in_features: int, out_features: int, groups: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        self.in_features, self.out_features, self.groups, self.eps = in_features, out_features, groups, eps
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, out_features).uniform_(-bound, bound))
        self.power = nn.Parameter(torch.ones(groups, out_features))
        self.scale = nn.Parameter(torch.ones(groups, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.groups == 1 and (x.dim() == 1 or x.shape[-2] != 1)
        if plain:
            x = x.unsqueeze(-2)
        lin = grouped_linear(x, self.weight, self.bias)
        y = hybrid_activation(lin, self.power, self.scale, self.eps)
        return y.squeeze(-2) if plain else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`groups` linear maps at once: x (..., G or 1, I), weight (G, O, I) -> (..., G, O)."""
    groups, out_features, in_features = weight.shape
    if x.shape[-2] == 1:  # one input shared by every group: a single matrix product
        y = x.squeeze(-2) @ weight.reshape(groups * out_features, in_features).T
        y = y.unflatten(-1, (groups, out_features))
    else:
        lead = x.shape[:-2]
        y = torch.bmm(x.reshape(-1, groups, in_features).transpose(0, 1), weight.transpose(1, 2))
        y = y.transpose(0, 1).reshape(*lead, groups, out_features)
    return y if bias is None else y + bias


class GroupedBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the features of every group, channel-first: input (groups, features, N)."""

    def __init__(self, features: int, groups: int) -> None:
        super().__init__(groups * features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(1, -1, x.shape[-1])).view_as(x)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval mode as `x * gain + shift`, per feature: lets the next layer absorb it."""
        gain = self.weight / torch.sqrt(self.running_var + self.eps)
        return gain, self.bias - self.running_mean * gain


class DynamicConv(nn.Module):
    """A convolution whose kernel is predicted per patch and per output channel.

    Each patch is all input channels of one k x k window, flattened channel-first
    (`F.unfold` order). For output channel o, a predictor
    `HybridDense -> BatchNorm -> HybridDense -> BatchNorm -> Linear` maps the patch to a
    kernel of the patch's size; the output is the mean over the patch of patch * kernel,
    plus `similar_conv(x)`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | str = 0,
        hidden: int = 16,
        kernel_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if padding == "same":
            if kernel_size % 2 == 0 or stride != 1:
                raise ValueError('padding="same" needs an odd kernel_size and stride 1')
            padding = kernel_size // 2
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int or 'same', not {padding!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.hidden = kernel_size, stride, padding, hidden
        patch = in_channels * kernel_size * kernel_size
        self.patch_size = patch
        self.dense1 = HybridDense(patch, hidden, groups=out_channels)
        self.norm1 = GroupedBatchNorm(hidden, out_channels)
        self.dense2 = HybridDense(hidden, hidden, groups=out_channels)
        self.norm2 = GroupedBatchNorm(hidden, out_channels)
        bound = kernel_init_scale / math.sqrt(hidden)
        self.kernel_weight = nn.Parameter(torch.empty(out_channels, patch, hidden).uniform_(-bound, bound))
        self.kernel_bias = nn.Parameter(torch.empty(out_channels, patch).uniform_(-bound, bound))
        self.similar_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.frozen: dict[tuple[bool, float], tuple[torch.Tensor, ...]] | None = None  # see `freeze`

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        return (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1

    def patches(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B * L, C * k * k + 1): every window, channel-first in `F.unfold` order,
        and a constant 1 that the biases multiply. One copy: no im2col buffer, no padding pass.
        Integer input (8-bit images) comes out in the layer's own float type.

        `channels_last` (non-overlapping windows of a channels-last x, see `reads_channels_last`)
        flattens each window (ky, kx, c) instead: the order it lies in memory, so the copy moves
        whole rows of k * C values. `forward` reorders the weights to match.
        """
        batch, channels, height, width = x.shape
        k, p = self.kernel_size, self.patch_size
        out_h, out_w = self.output_size(height, width)
        dtype = x.dtype if x.is_floating_point() else self.similar_conv.weight.dtype
        out = x.new_empty(batch * out_h * out_w, p + 1, dtype=dtype)
        out[:, p] = 1.0
        if channels_last:
            pixels = x.permute(0, 2, 3, 1).to(out.dtype)[:, : out_h * k, : out_w * k]  # (B, H, W, C)
            windows = pixels.reshape(batch, out_h, k, out_w, k * channels).transpose(2, 3)
            out[:, :p].view(batch, out_h, out_w, k, k * channels).copy_(windows)
        elif k == self.stride and self.padding == 0:  # non-overlapping windows: a strided view
            windows = x[:, :, : out_h * k, : out_w * k].reshape(batch, channels, out_h, k, out_w, k)
            out[:, :p].view(batch, out_h, out_w, channels, k, k).copy_(windows.permute(0, 2, 4, 1, 3, 5))
        else:
            windows = F.unfold(x.to(out.dtype), k, padding=self.padding, stride=self.stride)  # (B, P, L)
            out[:, :p].view(batch, -1, p).copy_(windows.transpose(1, 2))
        return out

    def reads_channels_last(self, x: torch.Tensor) -> bool:
        """Whether `forward` reads x's windows in memory order: non-overlapping windows of a
        channels-last x, such as an HxWx3 image array seen as (1, 3, H, W)."""
        return (
            self.kernel_size == self.stride
            and self.padding == 0
            and x.shape[1] > 1
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        )

    def forward(self, x: torch.Tensor, input_scale: float = 1.0) -> torch.Tensor:
        """(B, C, H, W) -> (B, O, H', W'). The layer reads `x * input_scale`: the scale is folded
        into the first matrix product, so 8-bit images need no float copy of their own."""
        batch, _, height, width = x.shape
        out_h, out_w = self.output_size(height, width)
        channels_last = self.reads_channels_last(x)
        weights = self.fused_weights(channels_last, input_scale)
        # CPU inference: the compiled kernel where it is built and serves this layer; for 8-bit
        # images (the encoder) it reads the pixels itself, for anything else it takes the patches
        out = native.pixel_mix(self, x, *weights) if native.serves_pixels(self, x) else None
        if out is None:
            patches = self.patches(x, channels_last)  # (N, P + 1)
            if self.training:
                out = self.mix(patches, *weights)
            elif native.serves(self, patches):
                out = native.mix(self, patches, *weights)
        if out is None:  # eval-mode BatchNorm is per patch, so chunks give the same result
            chunk = max(1, EVAL_CHUNK_VALUES // (self.out_channels * self.hidden))
            out = torch.cat([self.mix(part, *weights) for part in patches.split(chunk)], dim=1)
        return out.view(self.out_channels, batch, out_h, out_w).transpose(0, 1)

    def freeze(self) -> None:
        """Reuse the eval-mode `fused_weights` in every inference forward instead of rebuilding them.

        For weights that no longer change: `Codec` freezes its model, whose weights' hash it has
        already written into latent files. `train()` and moving the layer (`to`, `float`, ...)
        unfreeze it; changing parameters in place while frozen is not seen.
        """
        self.frozen = {}

    def train(self, mode: bool = True) -> DynamicConv:
        if mode:
            self.frozen = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # to(), float(), cuda(), ...: a kept copy would be stale
        self.frozen = None
        return super()._apply(fn, recurse)

    def fused_weights(
        self, channels_last: bool = False, input_scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything linear in the patch as one (2*O*H + 2*O, P + 1) matrix, and dense2's weights.

        The rows: dense1's pre-activation (O*H), patch . W_o for the kernel projection (O*H),
        patch . b_o for the kernel bias (O) and similar_conv itself (O); the last column holds
        the biases, against the patches' constant 1 (twice as fast as `addmm`, which first copies
        the broadcast bias into the whole output). Since
        mean_p patch_p * (W_o hidden_o + b_o)_p = (hidden_o . (patch W_o) + patch . b_o) / P,
        the (N, O, P) predicted kernels are never built. In eval mode both BatchNorms are affine
        maps and are folded into the weights after them.

        Every row is linear in the patch, so the columns can follow the input instead of the
        input following them: `input_scale` scales them (x * input_scale is what the layer
        reads) and `channels_last` orders them (ky, kx, c) like `patches(x, channels_last=True)`.
        """
        if self.frozen is None or self.training or torch.is_grad_enabled():
            return self.arrange(*self.fold(), channels_last, input_scale)
        key = (channels_last, input_scale)
        if key not in self.frozen:  # kept for later calls, maybe outside inference mode: ordinary tensors
            with torch.inference_mode(False), torch.no_grad():
                self.frozen[key] = self.arrange(*self.fold(), channels_last, input_scale)
        return self.frozen[key]

    def arrange(
        self, weight: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, channels_last: bool, input_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The columns of `fold`'s matrix ordered and scaled for the input (see `fused_weights`)."""
        if channels_last:  # columns (c, ky, kx) -> (ky, kx, c)
            c, k = self.in_channels, self.kernel_size
            order = torch.arange(self.patch_size, device=weight.device).view(c, k, k).permute(1, 2, 0).flatten()
            weight = weight[:, torch.cat([order, order.new_tensor([self.patch_size])])]
        if input_scale != 1.0:
            weight = torch.cat([weight[:, :-1] * input_scale, weight[:, -1:]], dim=1)
        return weight, w2, b2

    def fold(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`fused_weights` for plain channel-first input."""
        o, h, p = self.out_channels, self.hidden, self.patch_size
        projection = self.kernel_weight.transpose(1, 2)  # (O, H, P)
        kernel_bias, w2, b2 = self.kernel_bias, self.dense2.weight, self.dense2.bias
        if not self.training:
            gain1, shift1 = (t.view(o, 1, h) for t in self.norm1.scale_and_shift())
            gain2, shift2 = (t.view(o, h, 1) for t in self.norm2.scale_and_shift())
            w2, b2 = w2 * gain1, b2 + (w2 * shift1).sum(-1)
            kernel_bias = kernel_bias + (projection * shift2).sum(1)
            projection = projection * gain2
        weight = torch.cat(
            [
                self.dense1.weight.reshape(o * h, p),
                projection.reshape(o * h, p),
                kernel_bias,
                self.similar_conv.weight.reshape(o, p),
            ]
        )
        bias = torch.cat([self.dense1.bias.reshape(-1), weight.new_zeros(o * h + o), self.similar_conv.bias])
        return torch.cat([weight, bias[:, None]], dim=1), w2, b2[..., None]

    def mix(self, patches: torch.Tensor, weight: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        """(N, P + 1) patches with a constant-1 column -> (O, N): kernel products plus similar_conv.

        Everything runs channel-first, (O, H, N), so that each step is one contiguous batched
        matrix product or elementwise pass.
        """
        o, h, p = self.out_channels, self.hidden, self.patch_size
        d1, d2 = self.dense1, self.dense2
        linear = weight @ patches.T  # (2*O*H + 2*O, N)
        lin1, projected = linear[: o * h].view(o, h, -1), linear[o * h : 2 * o * h].view(o, h, -1)
        kernel_bias_part, similar = linear[2 * o * h : 2 * o * h + o], linear[2 * o * h + o :]
        hidden = hybrid_activation(lin1, d1.power[..., None], d1.scale[..., None], d1.eps)  # (O, H, N)
        if self.training:
            hidden = self.norm1(hidden)
        hidden = hybrid_activation(torch.baddbmm(b2, w2, hidden), d2.power[..., None], d2.scale[..., None], d2.eps)
        if self.training:
            hidden = self.norm2(hidden)
        products = hidden.mul_(projected) if not torch.is_grad_enabled() else hidden * projected
        return (products.sum(1) + kernel_bias_part) / p + similar

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, hidden={self.hidden}"
        )
