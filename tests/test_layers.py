"""The layers against literal references: HybridDense and DynamicConv against the per-channel loop,
DyConv2d (DY-CNN) and DyNetConv2d (DyNet) against one image at a time; gradients, shapes, temperature."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loop_reference import loop_dynamic_conv, predictors
from torch import nn

from hybrid_codec.layers import (
    POWER_RANGE,
    DyConv2d,
    DynamicConv,
    DyNetConv2d,
    GroupedBatchNorm,
    HybridDense,
    anneal_temperature,
    hybrid_activation,
)
from hybrid_codec.layers import _HybridActivation as HybridActivation

LOW, HIGH = POWER_RANGE


def literal_activation(lin, power, scale, eps):
    """The issue's formula, written out with autograd-differentiable torch ops."""
    power = power.clamp(*POWER_RANGE)
    return torch.nan_to_num(torch.copysign(scale * (torch.relu(lin) + eps) ** power, lin))


def randomize_dense(dense: HybridDense, gen: torch.Generator) -> None:
    with torch.no_grad():
        dense.weight.normal_(0, 0.5, generator=gen)
        dense.bias.normal_(0, 0.5, generator=gen)
        dense.power.uniform_(LOW, HIGH / 2, generator=gen)  # high powers of large values overflow float32 later
        dense.scale.uniform_(-1.5, 1.5, generator=gen)


def randomize_norm(norm: nn.BatchNorm1d, gen: torch.Generator) -> None:
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
        norm.bias.normal_(0, 0.3, generator=gen)
        norm.running_mean.normal_(0, 0.5, generator=gen)
        norm.running_var.uniform_(0.5, 2.0, generator=gen)


def random_layer(in_ch, out_ch, k, stride, padding, hidden=5, seed=0) -> DynamicConv:
    gen = torch.Generator().manual_seed(seed)
    layer = DynamicConv(in_ch, out_ch, k, stride=stride, padding=padding, hidden=hidden).double()
    for dense in (layer.dense1, layer.dense2):
        randomize_dense(dense, gen)
    for norm in (layer.norm1, layer.norm2):
        randomize_norm(norm, gen)
    with torch.no_grad():
        for p in (layer.kernel_weight, layer.kernel_bias, layer.similar_conv.weight, layer.similar_conv.bias):
            p.normal_(0, 0.5, generator=gen)
    return layer


# (in, out, kernel, stride, padding, input H, W)
GEOMETRIES = [
    pytest.param(3, 4, 8, 8, 0, 16, 24, id="k8-s8-p0"),
    pytest.param(3, 4, 8, 8, 0, 19, 21, id="k8-s8-p0-ragged"),
    pytest.param(4, 6, 3, 1, "same", 5, 7, id="k3-same"),
    pytest.param(2, 3, 5, 2, 1, 9, 11, id="k5-s2-p1"),
    pytest.param(3, 5, 1, 1, 0, 4, 6, id="k1"),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval-bn", "train-bn"])
@pytest.mark.parametrize("in_ch,out_ch,k,stride,padding,height,width", GEOMETRIES)
def test_vectorized_dynamic_conv_matches_loop_reference(in_ch, out_ch, k, stride, padding, height, width, train):
    layer = random_layer(in_ch, out_ch, k, stride, padding, seed=k + stride)
    layer.train(train)
    x = torch.randn(2, in_ch, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mlps = predictors(layer)  # copies the running stats before the layer's own forward updates them
    expected = loop_dynamic_conv(layer, x, mlps)
    got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if train:  # the batch statistics each loop BatchNorm1d saw are the ones the grouped norm recorded
        for norm, index in ((layer.norm1, 1), (layer.norm2, 3)):
            running_mean = torch.cat([mlp[index].running_mean for mlp in mlps])
            running_var = torch.cat([mlp[index].running_var for mlp in mlps])
            torch.testing.assert_close(norm.running_mean, running_mean, rtol=0, atol=1e-9)
            torch.testing.assert_close(norm.running_var, running_var, rtol=0, atol=1e-9)


def test_loop_reference_is_not_trivially_equal_to_similar_conv():
    """Guards the equivalence test: the dynamic part must contribute to the output."""
    layer = random_layer(3, 4, 3, 1, "same").eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    assert (loop_dynamic_conv(layer, x) - layer.similar_conv(x)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "k,stride,padding,height,width",
    [(8, 8, 0, 24, 40), (3, 1, "same", 7, 5), (5, 2, 1, 13, 10), (1, 1, 0, 3, 9), (4, 3, 2, 11, 8)],
)
def test_dynamic_conv_output_shape_matches_conv2d(k, stride, padding, height, width):
    layer = DynamicConv(2, 3, k, stride=stride, padding=padding, hidden=4).eval()
    x = torch.rand(2, 2, height, width)
    pad = k // 2 if padding == "same" else padding
    expected = nn.Conv2d(2, 3, k, stride, pad)(x).shape
    assert layer(x).shape == expected
    assert (2, 3, *layer.output_size(height, width)) == expected


@pytest.mark.parametrize("k", [2, 4, 8])
def test_same_padding_refuses_even_kernel(k):
    with pytest.raises(ValueError, match="odd kernel_size"):
        DynamicConv(3, 4, k, padding="same")


def test_same_padding_refuses_stride():
    with pytest.raises(ValueError, match="stride 1"):
        DynamicConv(3, 4, 3, stride=2, padding="same")


@pytest.mark.parametrize("padding", [-1, "valid", 1.5])
def test_bad_padding_refused(padding):
    with pytest.raises(ValueError, match="padding"):
        DynamicConv(3, 4, 3, padding=padding)


def test_every_dynamic_conv_parameter_gets_a_gradient():
    layer = random_layer(2, 3, 3, 1, "same", hidden=4).train()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    (layer(x) * torch.randn(2, 3, 5, 5, dtype=torch.float64)).sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("k,stride,padding", [(3, 1, "same"), (4, 4, 0), (3, 2, 1)], ids=["same", "windows", "unfold"])
def test_dynamic_conv_input_gradient_matches_loop_reference(k, stride, padding):
    """The decoder's input is the encoder's output: training needs the gradient through the patches."""
    layer = random_layer(2, 3, k, stride, padding, hidden=4).eval()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    x_loop = x.detach().clone().requires_grad_()
    weights = torch.randn_like(layer(x))
    (layer(x) * weights).sum().backward()
    (loop_dynamic_conv(layer, x_loop) * weights).sum().backward()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, x_loop.grad, rtol=0, atol=1e-9)


def test_dynamic_conv_gradients_match_loop_reference():
    layer = random_layer(2, 3, 3, 1, "same", hidden=4).eval()
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    weights = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    (layer(x) * weights).sum().backward()
    mlps = predictors(layer)
    (loop_dynamic_conv(layer, x, mlps) * weights).sum().backward()
    for o, mlp in enumerate(mlps):  # mlp = dense1, norm1, dense2, norm2, kernel
        for name in ("power", "scale", "weight", "bias"):
            torch.testing.assert_close(getattr(layer.dense1, name).grad[o], getattr(mlp[0], name).grad[0])
            torch.testing.assert_close(getattr(layer.dense2, name).grad[o], getattr(mlp[2], name).grad[0])
        torch.testing.assert_close(layer.kernel_weight.grad[o], mlp[4].weight.grad)


# ---- HybridDense -------------------------------------------------------------------------------


def random_dense(in_features, out_features, groups=1, seed=0, dtype=torch.float64) -> HybridDense:
    dense = HybridDense(in_features, out_features, groups=groups).to(dtype)
    randomize_dense(dense, torch.Generator().manual_seed(seed))
    return dense


def test_hybrid_dense_power_and_scale_receive_gradients():
    dense = HybridDense(6, 5)  # default init: power 1, scale 1, float32 as in training
    x = torch.randn(32, 6)
    (dense(x) * torch.randn(32, 5)).sum().backward()
    assert torch.all(dense.power.grad != 0)
    assert torch.all(dense.scale.grad != 0)
    assert torch.all(dense.weight.grad != 0)


def test_hybrid_dense_power_and_scale_change_after_an_optimizer_step():
    torch.manual_seed(0)
    dense = HybridDense(4, 3)
    before = dense.power.detach().clone(), dense.scale.detach().clone()
    optimizer = torch.optim.SGD(dense.parameters(), lr=0.1)
    x, target = torch.randn(64, 4), torch.randn(64, 3)
    F.mse_loss(dense(x), target).backward()
    optimizer.step()
    assert not torch.equal(dense.power.detach(), before[0])
    assert not torch.equal(dense.scale.detach(), before[1])


def test_hybrid_dense_matches_literal_formula():
    dense = random_dense(7, 5, seed=3)
    with torch.no_grad():
        dense.scale[0, :2] = torch.tensor([-0.7, 0.0], dtype=torch.float64)
    x = torch.randn(40, 7, dtype=torch.float64)
    lin = x @ dense.weight[0].T + dense.bias[0]
    expected = literal_activation(lin, dense.power[0], dense.scale[0], dense.eps)
    torch.testing.assert_close(dense(x), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the no-grad fast path computes the same thing
        torch.testing.assert_close(dense(x), expected, rtol=1e-12, atol=1e-12)


def test_hybrid_activation_clamps_power_to_range():
    lin = torch.rand(10, 3, dtype=torch.float64) + 0.5
    scale = torch.ones(3, dtype=torch.float64)
    outside = torch.tensor([0.01, 10.0, -3.0], dtype=torch.float64)
    edges = torch.tensor([LOW, HIGH, LOW], dtype=torch.float64)
    torch.testing.assert_close(hybrid_activation(lin, outside, scale, 1e-6), (lin + 1e-6) ** edges)


def test_hybrid_dense_plain_input_with_groups_1():
    dense = random_dense(6, 4, seed=1)
    x = torch.randn(9, 6, dtype=torch.float64)
    out = dense(x)
    assert out.shape == (9, 4)
    rows = torch.stack([dense(row) for row in x])  # 1-D input (in,) -> (out,)
    assert dense(x[0]).shape == (4,)
    torch.testing.assert_close(out, rows)
    assert dense(x[:1]).shape == (1, 4)  # a batch of one is not mistaken for a grouped input
    torch.testing.assert_close(dense(x[:1]), out[:1])
    assert dense(torch.randn(2, 3, 6, dtype=torch.float64)).shape == (2, 3, 4)


def test_grouped_hybrid_dense_equals_separate_layers():
    groups = 3
    dense = random_dense(5, 4, groups=groups, seed=2)
    separate = []
    for g in range(groups):
        one = HybridDense(5, 4).double()
        for name in ("weight", "bias", "power", "scale"):
            getattr(one, name).data.copy_(getattr(dense, name).data[g : g + 1])
        separate.append(one)
    x = torch.randn(8, groups, 5, dtype=torch.float64)
    out = dense(x)
    assert out.shape == (8, groups, 4)
    for g, one in enumerate(separate):
        torch.testing.assert_close(out[:, g], one(x[:, g]))
    shared = torch.randn(8, 1, 5, dtype=torch.float64)  # one input read by every group
    out = dense(shared)
    assert out.shape == (8, groups, 4)
    for g, one in enumerate(separate):
        torch.testing.assert_close(out[:, g], one(shared[:, 0]))


def test_grouped_batch_norm_normalizes_each_group_feature_separately():
    norm = GroupedBatchNorm(4, 3).train()
    x = torch.randn(50, 3, 4) * torch.arange(1, 13.0).view(3, 4) + 5  # (N, groups, features)
    y = norm(x)
    assert y.shape == (50, 3, 4)
    torch.testing.assert_close(y.mean(0), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(3, 4), atol=1e-3, rtol=0)


def test_grouped_batch_norm_in_eval_mode_is_its_scale_and_shift():
    norm = GroupedBatchNorm(4, 3).train()
    norm(torch.randn(50, 3, 4) * 3 + 1)  # move the running statistics
    norm.eval()
    x = torch.randn(7, 3, 4)
    gain, shift = (t.view(3, 4) for t in norm.scale_and_shift())
    torch.testing.assert_close(norm(x), x * gain + shift)


# ---- the hand-written backward -------------------------------------------------------------------


def away_from_zero(shape, gen, margin=0.1):
    """Inputs of both signs but not near relu's kink at 0, where finite differences are meaningless."""
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    return torch.where(x.abs() < margin, x.sign() * margin + x, x)


def test_activation_gradcheck_negative_scales():
    gen = torch.Generator().manual_seed(0)
    lin = away_from_zero((6, 4), gen).requires_grad_()
    power = torch.tensor([0.5, 1.0, 1.7, 3.0], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([-1.3, 0.8, -0.2, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p, s: hybrid_activation(a, p, s, 1e-6), (lin, power, scale))


def test_activation_gradcheck_powers_at_clamp_edges():
    """The autograd Function itself at exactly the clamp edges (the clamp is not differentiable there)."""
    gen = torch.Generator().manual_seed(1)
    lin = away_from_zero((5, 4), gen).requires_grad_()
    power = torch.tensor([LOW, HIGH, LOW, HIGH], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.0, -1.0, -0.5, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p, s: HybridActivation.apply(a, p, s, 1e-6), (lin, power, scale))


def test_activation_gradcheck_near_and_beyond_clamp_edges():
    gen = torch.Generator().manual_seed(2)
    lin = away_from_zero((5, 4), gen).requires_grad_()
    power = torch.tensor([LOW + 1e-3, HIGH - 1e-3, LOW - 0.1, HIGH + 0.5], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([-1.0, 0.7, 1.2, -0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p, s: hybrid_activation(a, p, s, 1e-6), (lin, power, scale))
    hybrid_activation(lin, power, scale, 1e-6).sum().backward()
    assert torch.all(power.grad[:2] != 0)
    assert torch.all(power.grad[2:] == 0)  # clamped: no gradient pushes the power further out


def test_activation_gradcheck_grouped_broadcast():
    """Power and scale of shape (G, O) broadcast over a batch, as in HybridDense."""
    gen = torch.Generator().manual_seed(3)
    lin = away_from_zero((3, 2, 3), gen).requires_grad_()
    power = (torch.rand(2, 3, dtype=torch.float64, generator=gen) * 2 + 0.5).requires_grad_()
    scale = torch.randn(2, 3, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, p, s: hybrid_activation(a, p, s, 1e-3), (lin, power, scale))


def test_hand_written_backward_matches_autograd_of_literal_formula():
    gen = torch.Generator().manual_seed(4)
    inputs = (
        torch.randn(30, 2, 5, dtype=torch.float64, generator=gen),
        torch.rand(2, 5, dtype=torch.float64, generator=gen) * 4,  # some below POWER_RANGE's low end
        torch.randn(2, 5, dtype=torch.float64, generator=gen),
    )
    inputs[0][::4] = 0.0  # exactly at relu's kink: like torch.relu, no gradient flows there
    weights = torch.randn(30, 2, 5, dtype=torch.float64, generator=gen)
    grads = []
    for fn in (hybrid_activation, literal_activation):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves, 1e-6)
        (out * weights).sum().backward()
        grads.append((out.detach(), *[leaf.grad for leaf in leaves]))
    for ours, literal in zip(*grads, strict=True):
        torch.testing.assert_close(ours, literal, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grad_enabled", [False, True])
def test_nan_input_gives_zero_output(grad_enabled):
    lin = torch.tensor([[float("nan"), 1.0, -2.0], [0.5, float("nan"), float("nan")]], dtype=torch.float64)
    power = torch.tensor([1.5, 2.0, 0.5], dtype=torch.float64, requires_grad=grad_enabled)
    scale = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64, requires_grad=grad_enabled)
    out = hybrid_activation(lin, power, scale, 1e-6)
    assert out[0, 0] == 0 and out[1, 1] == 0 and out[1, 2] == 0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 1:], literal_activation(lin[0, 1:], power[1:], scale[1:], 1e-6))


def test_hybrid_dense_nan_input_gives_zero_not_nan():
    dense = random_dense(3, 4)
    x = torch.tensor([[float("nan"), 0.0, 1.0]], dtype=torch.float64)
    out = dense(x)
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------- DY-CNN and DyNet


def literal_dy_conv(layer: DyConv2d | DyNetConv2d, x: torch.Tensor) -> torch.Tensor:
    """Each sample on its own, as the papers write it: attention from its pooled input, one kernel, one conv."""
    outputs = []
    for sample in x.split(1):
        logits = layer.attention(sample.mean((2, 3)))[0]
        if isinstance(layer, DyConv2d):  # pi_k for the whole kernel
            pi = torch.softmax(logits / layer.temperature, 0)
            weight = sum(pi[k] * layer.weight[k] for k in range(layer.K))
            bias = None if layer.bias is None else sum(pi[k] * layer.bias[k] for k in range(layer.K))
        else:  # pi[o, k] per output channel
            pi = torch.softmax(logits.view(layer.out_channels, layer.K) / layer.temperature, 1)
            weight = torch.stack(
                [sum(pi[o, k] * layer.weight[k, o] for k in range(layer.K)) for o in range(layer.out_channels)]
            )
            bias = None
            if layer.bias is not None:
                bias = torch.stack(
                    [sum(pi[o, k] * layer.bias[k, o] for k in range(layer.K)) for o in range(layer.out_channels)]
                )
        outputs.append(F.conv2d(sample, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outputs)


def random_dy(cls, in_ch, out_ch, k, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = cls(in_ch, out_ch, k, **kwargs).double()
    with torch.no_grad():  # attention far from uniform, so that a wrong mixture shows
        for p in layer.attention.parameters():
            p.normal_(0, 1.5)
    return layer


# (in, out, kernel, keyword arguments, input H, W)
DY_GEOMETRIES = [
    pytest.param(3, 4, 8, {"stride": 8}, 16, 24, id="encoder-k8-s8"),
    pytest.param(4, 12, 3, {"padding": "same"}, 5, 7, id="decoder-k3-same"),
    pytest.param(4, 6, 3, {"stride": 2, "padding": 2, "dilation": 2}, 11, 9, id="k3-s2-d2"),
    pytest.param(6, 4, 3, {"padding": 1, "groups": 2, "K": 3}, 6, 5, id="groups2-K3"),
    pytest.param(4, 8, 1, {"groups": 4, "bias": False, "reduction": 2, "K": 2}, 4, 3, id="k1-depthwise-nobias"),
]


@pytest.mark.parametrize("cls", [DyConv2d, DyNetConv2d])
@pytest.mark.parametrize("temperature", [1.0, 7.0])
@pytest.mark.parametrize("in_ch,out_ch,k,kwargs,height,width", DY_GEOMETRIES)
def test_dy_convs_match_per_sample_reference(cls, temperature, in_ch, out_ch, k, kwargs, height, width):
    layer = random_dy(cls, in_ch, out_ch, k, temperature=temperature, **kwargs)
    x = torch.randn(3, in_ch, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = literal_dy_conv(layer, x)
    pad = k // 2 if kwargs.get("padding") == "same" else kwargs.get("padding", 0)
    geometry = {key: v for key, v in kwargs.items() if key not in ("K", "reduction")}
    conv = nn.Conv2d(in_ch, out_ch, k, **{**geometry, "padding": pad})
    assert expected.shape == conv(x.float()).shape  # the nn.Conv2d signature and output size
    for training in (True, False):  # DyNet: fused outputs in training, the fused kernel in eval
        got = layer.train(training)(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_dy_samples_get_their_own_kernels():
    """Guards the test above: the samples of a batch get different kernels, each its own alone."""
    for cls in (DyConv2d, DyNetConv2d):
        layer = random_dy(cls, 4, 6, 3, padding=1)
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        pi = layer.attend(x)
        assert (pi[0] - pi[1]).abs().max() > 1e-2
        torch.testing.assert_close(layer(x)[1:], layer(x[1:]))  # a sample's output does not see the batch


@pytest.mark.parametrize("cls", [DyConv2d, DyNetConv2d])
def test_dy_conv_with_one_kernel_is_conv2d(cls):
    layer = cls(3, 5, 3, padding=1, K=1)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(layer.weight[0])
        conv.bias.copy_(layer.bias[0])
    x = torch.rand(2, 3, 6, 7)
    torch.testing.assert_close(layer(x), conv(x))


@pytest.mark.parametrize("cls", [DyConv2d, DyNetConv2d])
def test_high_temperature_makes_attention_near_uniform(cls):
    layer = random_dy(cls, 4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert (layer.attend(x) - 1 / layer.K).abs().max() > 0.1
    layer.temperature = 30.0
    assert (layer.attend(x) - 1 / layer.K).abs().max() < 0.05
    assert torch.allclose(layer.attend(x).sum(-1), torch.ones(()).double())


@pytest.mark.parametrize("cls", [DyConv2d, DyNetConv2d])
def test_every_dy_parameter_gets_a_gradient(cls):
    layer = random_dy(cls, 4, 6, 3, padding=1).train()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [DyConv2d, DyNetConv2d])
def test_dy_conv_refuses_groups_that_do_not_divide(cls):
    with pytest.raises(ValueError, match="groups"):
        cls(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="same"):
        cls(4, 6, 3, stride=2, padding="same")


def test_dynet_training_and_eval_paths_have_the_same_gradients():
    layer = random_dy(DyNetConv2d, 4, 6, 3, stride=2, padding=1, groups=2)
    x = torch.randn(3, 4, 9, 7, dtype=torch.float64)
    grads = []
    for mode in (layer.train, layer.eval):
        mode()
        layer.zero_grad()
        layer(x).sin().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_attention_width_never_below_k():
    layer = DyConv2d(3, 4, 8, stride=8, K=4, reduction=4)
    assert layer.attention[0].out_features == 4
    assert DyConv2d(64, 4, 1, reduction=4).attention[0].out_features == 16


def test_temperature_anneals_linearly_from_30_to_1_then_stays():
    model = nn.Sequential(DyConv2d(3, 4, 3), nn.ReLU(), DyNetConv2d(4, 4, 1), DynamicConv(4, 4, 1))
    seen = [anneal_temperature(model, step, 100) for step in (0, 50, 100, 5000)]
    assert seen == [30.0, 15.5, 1.0, 1.0]
    assert model[0].temperature == model[2].temperature == 1.0
    assert anneal_temperature(model, 0, 0) == 1.0  # no schedule: inference's temperature throughout
