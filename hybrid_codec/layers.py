"""The codec's layers as their papers write them: HybridDense and DynamicConv ("Mind Your Own
Kernels"), and the two best-known dynamic convolutions beside them, DyConv2d (DY-CNN) and
DyNetConv2d (DyNet).

DynamicConv predicts, for every patch, one kernel per output channel with a small HybridDense
MLP and takes the patch . kernel product; an ordinary Conv2d with the same geometry
("similar_conv") learns what all patches share. Every predictor of a layer runs in one batched
matrix product: there is no Python loop over output channels or patches.

DyConv2d and DyNetConv2d instead mix K kernels by an attention computed from the whole image
(global average pooling), so their output at a pixel depends on every pixel: see docs/layers.md.
They take nn.Conv2d's arguments and run the batch as one grouped convolution.

This is the training path and the reference. Inference on the CPU takes `fast.py` for the
DynamicConv codec, which computes the same function from these parameters, tested against this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

POWER_RANGE = (0.25, 4.0)
"""The learned power is clamped to this range so that `(relu + eps) ** power` stays finite."""


def hybrid_activation(lin: torch.Tensor, power: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """`copysign(scale * (relu(lin) + eps) ** power, lin)` with NaNs zeroed; power clamped to POWER_RANGE."""
    power = power.clamp(*POWER_RANGE)
    if torch.is_grad_enabled() and (lin.requires_grad or power.requires_grad or scale.requires_grad):
        return _HybridActivation.apply(lin, power, scale, eps)
    return _signed_scaled(_relu_power(lin, power, eps), lin, scale)


def _relu_power(lin: torch.Tensor, power: torch.Tensor, eps: float) -> torch.Tensor:
    """(relu(lin) + eps) ** power as exp(power * log(.)), making one new tensor."""
    return lin.clamp_min(0).add_(eps).log_().mul_(power).exp_()


def _signed_scaled(lifted: torch.Tensor, lin: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale * lifted with the sign of lin, NaN -> 0, in place."""
    return lifted.mul_(scale).copysign_(lin).nan_to_num_(nan=0.0)


class _HybridActivation(torch.autograd.Function):
    """The activation with a hand-written backward.

    Autograd's version of pow / copysign / nan_to_num keeps several full-size temporaries
    and takes about three times as long; this one keeps `lin` and `base ** power` only.
    """

    @staticmethod
    def forward(ctx, lin: torch.Tensor, power: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        lifted = _relu_power(lin, power, eps)
        ctx.save_for_backward(lin, power, scale, lifted)
        ctx.eps = eps
        return _signed_scaled(lifted.clone(), lin, scale)

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
    """BatchNorm over the features of every group: input (..., groups, features), statistics over `...`."""

    def __init__(self, features: int, groups: int) -> None:
        super().__init__(groups * features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, self.num_features)).view_as(x)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval mode as `x * gain + shift`, per feature: lets the next layer absorb it."""
        gain = self.weight / torch.sqrt(self.running_var + self.eps)
        return gain, self.bias - self.running_mean * gain


def conv_padding(padding: int | str, kernel_size: int, stride: int, dilation: int = 1) -> int:
    """An int padding, "same" resolved as nn.Conv2d would for an odd kernel at stride 1."""
    if padding == "same":
        if kernel_size % 2 == 0 or stride != 1:
            raise ValueError('padding="same" needs an odd kernel_size and stride 1')
        return dilation * (kernel_size // 2)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int or 'same', not {padding!r}")
    return padding


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
    ) -> None:
        super().__init__()
        padding = conv_padding(padding, kernel_size, stride)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.hidden = kernel_size, stride, padding, hidden
        patch = in_channels * kernel_size * kernel_size
        self.patch_size = patch
        self.dense1 = HybridDense(patch, hidden, groups=out_channels)
        self.norm1 = GroupedBatchNorm(hidden, out_channels)
        self.dense2 = HybridDense(hidden, hidden, groups=out_channels)
        self.norm2 = GroupedBatchNorm(hidden, out_channels)
        bound = 1 / math.sqrt(hidden)  # the kernel projection: one Linear(hidden, patch) per output channel
        self.kernel_weight = nn.Parameter(torch.empty(out_channels, patch, hidden).uniform_(-bound, bound))
        self.kernel_bias = nn.Parameter(torch.empty(out_channels, patch).uniform_(-bound, bound))
        self.similar_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        return (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, O, H', W')."""
        batch, _, height, width = x.shape
        out_h, out_w = self.output_size(height, width)
        patches = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride).transpose(1, 2)  # (B, L, P)
        hidden = self.norm1(self.dense1(patches.unsqueeze(-2)))  # (B, L, O, H): every channel reads the patch
        hidden = self.norm2(self.dense2(hidden))
        kernels = torch.einsum("oph,bloh->blop", self.kernel_weight, hidden) + self.kernel_bias  # (B, L, O, P)
        dynamic = (kernels * patches.unsqueeze(-2)).mean(-1)  # (B, L, O): patch . kernel / P
        return dynamic.transpose(1, 2).reshape(batch, self.out_channels, out_h, out_w) + self.similar_conv(x)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, hidden={self.hidden}"
        )


class _KernelMixture(nn.Module):
    """What DY-CNN and DyNet share: K kernels with nn.Conv2d's geometry and a per-image attention over them.

    The attention reads the globally average-pooled input: `FC -> ReLU -> FC -> softmax(. / temperature)`.
    Its hidden width is in_channels // reduction, but never below K: an RGB input has 3 channels.
    `temperature` is a plain attribute, not a tensor of the state: the training schedule sets it.
    """

    per_channel = False  # DyNet: a softmax over K per output channel, not one for the whole layer

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | str = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        K: int = 4,
        reduction: int = 4,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.dilation, self.groups, self.K = stride, dilation, groups, K
        self.padding = conv_padding(padding, kernel_size, stride, dilation)
        self.temperature = temperature
        hidden = max(in_channels // reduction, K)
        self.attention = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, K * (out_channels if self.per_channel else 1))
        )
        fan_in = in_channels // groups * kernel_size * kernel_size
        bound = 1 / math.sqrt(fan_in)  # nn.Conv2d's initialisation, for each of the K kernels
        shape = (K, out_channels, in_channels // groups, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(K, out_channels).uniform_(-bound, bound)) if bias else None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x.mean((2, 3)))

    def grouped_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Per-sample kernels (B, O, I/g, k, k) in one convolution: the batch folded into the groups."""
        batch = x.shape[0]
        y = F.conv2d(
            x.reshape(1, -1, *x.shape[2:]),
            weight.reshape(-1, *weight.shape[2:]),
            None if bias is None else bias.reshape(-1),
            self.stride,
            self.padding,
            self.dilation,
            batch * self.groups,
        )
        return y.view(batch, self.out_channels, *y.shape[2:])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"K={self.K}, temperature={self.temperature:g}"
        )


class DyConv2d(_KernelMixture):
    """DY-CNN ("Dynamic Convolution: Attention over Convolution Kernels", Chen et al. 2020).

    `W(x) = sum_k pi_k(x) W_k`, `b(x) = sum_k pi_k(x) b_k`, with one attention `pi(x)` (a softmax over
    K) per image, the same for weights and biases. Train from temperature 30 annealed to 1
    (near-uniform attention early is what makes it train); 1 is what inference uses.
    """

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """pi (B, K)."""
        return torch.softmax(self.logits(x) / self.temperature, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pi = self.attend(x)
        weight = torch.einsum("bk,koihw->boihw", pi, self.weight)
        return self.grouped_conv(x, weight, None if self.bias is None else pi @ self.bias)


class DyNetConv2d(_KernelMixture):
    """DyNet ("Dynamic Convolution for Accelerating CNNs", Zhang et al. 2020).

    A coefficient per output channel and kernel, `pi (B, O, K)` (softmax over K), fuses the K kernels
    into one per image: `W(x)[o] = sum_k pi[o, k] W_k[o]`, and likewise the bias. In training the K
    outputs are fused instead, `y[o] = sum_k pi[o, k] conv(x, W_k)[o]`: the same function, as one
    ordinary convolution over the batch.
    """

    per_channel = True

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """pi (B, O, K)."""
        return torch.softmax(self.logits(x).view(-1, self.out_channels, self.K) / self.temperature, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pi = self.attend(x)
        bias = None if self.bias is None else torch.einsum("bok,ko->bo", pi, self.bias)
        if not self.training:
            return self.grouped_conv(x, torch.einsum("bok,koihw->boihw", pi, self.weight), bias)
        return self.fused_outputs(x, pi, bias)

    def fused_outputs(self, x: torch.Tensor, pi: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """sum_k pi[:, o, k] conv(x, W_k)[o]: K kernels in one convolution, each group reading its inputs."""
        g, per = self.groups, self.out_channels // self.groups
        weight = self.weight.unflatten(1, (g, per)).transpose(0, 1).reshape(-1, *self.weight.shape[2:])  # (g K per)
        y = F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, g)
        y = y.unflatten(1, (g, self.K, per))  # (B, g, K, per, H', W')
        mixed = (y * pi.unflatten(1, (g, per)).transpose(2, 3)[..., None, None]).sum(2).flatten(1, 2)
        return mixed if bias is None else mixed + bias[..., None, None]


def anneal_temperature(module: nn.Module, step: int, steps: int, start: float = 30.0) -> float:
    """DY-CNN's schedule: every kernel mixture's temperature from `start` at step 0 linearly to 1 at `steps`."""
    temperature = 1.0 if steps <= 0 else start + (1.0 - start) * min(step / steps, 1.0)
    for layer in module.modules():
        if isinstance(layer, _KernelMixture):
            layer.temperature = temperature
    return temperature
