"""fast.py against the plain layer: the folded PyTorch path everywhere, the compiled kernel (_fast.c) where it runs."""

from __future__ import annotations

import platform
import sys
import warnings

import numpy as np
import pytest
import torch
from test_layers import GEOMETRIES as LAYER_GEOMETRIES
from test_layers import random_layer

from hybrid_codec import fast
from hybrid_codec.fast import FastDynamicConv
from hybrid_codec.layers import hybrid_activation

needs_kernel = pytest.mark.skipif(
    not fast.kernel_available(), reason="the kernel is not built or this CPU has no AVX-512"
)


def pytorch_only(monkeypatch) -> None:
    monkeypatch.setenv("HYBRID_CODEC_KERNEL", "0")


@pytest.mark.parametrize("in_ch,out_ch,k,stride,padding,height,width", LAYER_GEOMETRIES)
def test_folded_pytorch_path_matches_the_plain_layer(monkeypatch, in_ch, out_ch, k, stride, padding, height, width):
    """BatchNorm folded into the weights, no kernels built: the same function as layers.DynamicConv."""
    pytorch_only(monkeypatch)
    layer = random_layer(in_ch, out_ch, k, stride, padding, seed=k + stride).eval()
    x = torch.randn(2, in_ch, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(FastDynamicConv(layer)(x), expected, rtol=0, atol=1e-9)


def test_chunks_of_patches_do_not_change_the_pytorch_path(monkeypatch):
    pytorch_only(monkeypatch)
    layer = random_layer(3, 4, 3, 1, "same", seed=5).eval()
    # 7 patches per chunk: 2 x 6 x 5 = 60 patches make 9 chunks, the last one short
    monkeypatch.setattr(fast, "PYTORCH_CHUNK_VALUES", 7 * layer.out_channels * layer.hidden)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(FastDynamicConv(layer)(x), expected, rtol=0, atol=1e-9)


def test_channels_last_and_eight_bit_inputs_match_the_plain_layer(monkeypatch):
    """An HxWx3 array seen as (1, 3, H, W) is read in memory order, the weights reordered to match;
    uint8 input is read as x / 255 with the scale folded into the weights."""
    pytorch_only(monkeypatch)
    layer = random_layer(3, 4, 8, 8, 0, seed=9).eval()
    plan = FastDynamicConv(layer)
    pixels = torch.randint(0, 256, (2, 24, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    channels_last = pixels.permute(0, 3, 1, 2)  # a view, as the codec makes of an image array
    assert plan.reads_channels_last(channels_last) and not plan.reads_channels_last(channels_last.contiguous())
    with torch.no_grad():
        expected = layer(channels_last.double() / 255)
    torch.testing.assert_close(plan(channels_last.double() / 255), expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(plan(channels_last, 1 / 255), expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(plan(channels_last.contiguous(), 1 / 255), expected, rtol=0, atol=1e-9)


def test_the_plan_reads_the_weights_once(monkeypatch):
    """Latent files name the weights' hash: a plan is a snapshot, unchanged by later edits of the layer."""
    pytorch_only(monkeypatch)
    layer = random_layer(4, 3, 3, 1, "same", seed=11).eval()
    plan = FastDynamicConv(layer)
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    before = plan(x)
    with torch.no_grad():
        layer.dense1.bias.add_(1.0)
        layer.dense2.power.mul_(1.5)  # the activations' parameters are copied too, not read at each call
        assert not torch.allclose(layer(x), before)
    assert torch.equal(plan(x), before)
    assert not torch.allclose(FastDynamicConv(layer)(x), before)


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"), reason="built on x86-64 Linux"
)
def test_the_kernel_is_built_on_x86_64_linux():
    """The install compiles it here; a silent fall back to PyTorch would hide a broken build."""
    assert fast._fast is not None
    assert fast._fast.OPENMP


# (in, out, kernel, stride, padding, H, W, hidden): the decoder's and encoder's geometries, ragged
# patch counts (not multiples of the kernel's 64-patch blocks), hidden sizes from 1 to the maximum
GEOMETRIES = [
    pytest.param(4, 24, 3, 1, "same", 9, 13, 22, id="decoder-like"),
    pytest.param(3, 4, 8, 8, 0, 40, 72, 14, id="encoder-like"),
    pytest.param(3, 4, 8, 8, 0, 19, 21, 3, id="encoder-ragged"),
    pytest.param(2, 3, 5, 2, 1, 17, 23, 1, id="k5-s2-hidden1"),
    pytest.param(4, 2, 3, 1, "same", 16, 8, 64, id="hidden64"),
]


@needs_kernel
@pytest.mark.parametrize("in_ch,out_ch,k,stride,padding,height,width,hidden", GEOMETRIES)
def test_kernel_matches_the_pytorch_path(monkeypatch, in_ch, out_ch, k, stride, padding, height, width, hidden):
    layer = random_layer(in_ch, out_ch, k, stride, padding, hidden=hidden, seed=hidden).float().eval()
    plan = FastDynamicConv(layer)
    x = torch.randn(2, in_ch, height, width, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert plan.kernel_takes_patches(plan.patches(x, False, torch.float32))
        got = plan(x)
        pytorch_only(monkeypatch)
        expected = plan(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@needs_kernel
def test_kernel_output_does_not_depend_on_thread_count():
    layer = random_layer(4, 24, 3, 1, "same", hidden=22).float().eval()
    plan = FastDynamicConv(layer)
    x = torch.randn(1, 4, 20, 30, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = plan(x)
            torch.set_num_threads(2)
            two = plan(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_chunks_do_not_change_the_output(monkeypatch):
    layer = random_layer(4, 6, 3, 1, "same", hidden=5).float().eval()
    plan = FastDynamicConv(layer)
    x = torch.randn(1, 4, 30, 31, generator=torch.Generator().manual_seed(5))  # 930 patches
    with torch.inference_mode():
        whole = plan(x)
        monkeypatch.setattr(fast, "KERNEL_CHUNK_VALUES", 64 * (2 * 6 * 5 + 2 * 6))  # 64 patches a chunk: 15 chunks
        assert torch.equal(plan(x), whole)


EDGES = [float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 1e30, 0.0, -0.0, 1e-40, -1e-40, 1e-6, 0.5, 2.0, -3.0]


@needs_kernel
@pytest.mark.parametrize("power,scale", [(1.0, 1.0), (0.25, 2.0), (4.0, 1.0), (4.0, -0.5), (2.7, 1e-3), (0.1, 9.0)])
def test_activation_matches_pytorch_on_edge_values(power, scale):
    """NaN -> 0, overflow -> the largest float with the input's sign, powers clamped, like the formula."""
    x = torch.tensor(EDGES + torch.randn(50, generator=torch.Generator().manual_seed(6)).mul(30).tolist())
    got = fast.kernel_activation(x, power, scale, 1e-6)
    expected = hybrid_activation(x, torch.tensor(power), torch.tensor(scale), 1e-6)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))


@needs_kernel
def test_activation_relative_error_over_the_whole_range():
    """Every float from 1e-30 to 1e30 and back, each power: within 2e-6 of float64's exact value."""
    x = torch.logspace(-30, 30, 20000, dtype=torch.float64)
    x = torch.cat([x, -x, torch.rand(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 4])
    for power in (0.25, 0.6, 1.0, 1.9, 3.3, 4.0):
        exact = hybrid_activation(
            x, torch.tensor(power, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64), 1e-6
        )
        finite = exact.abs() < 3e38
        got = fast.kernel_activation(x.float(), power, 1.3, 1e-6).double()
        relative = ((got - exact).abs() / exact.abs())[finite]
        assert relative.max() < 2e-6, (power, relative.max().item())


@needs_kernel
def test_zero_scale_is_left_to_pytorch(monkeypatch):
    layer = random_layer(4, 6, 3, 1, "same").float().eval()
    plan = FastDynamicConv(layer)
    with torch.no_grad():
        layer.dense2.scale[0, 0] = 0.0
    x = torch.full((1, 4, 5, 5), 1e30)  # overflows: 0 * inf, which the kernel would make NaN
    with torch.inference_mode():
        assert plan._kernel_parameters is None
        got = plan(x)
        pytorch_only(monkeypatch)
        torch.testing.assert_close(got, plan(x), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="non-zero"):
        fast.kernel_activation(torch.ones(3), 1.0, 0.0, 1e-6)


@needs_kernel
def test_float64_training_layers_and_off_switch_take_the_pytorch_path(monkeypatch):
    layer = random_layer(4, 6, 3, 1, "same").float().eval()
    plan = FastDynamicConv(layer)
    patches = plan.patches(torch.rand(1, 4, 5, 5), False, torch.float32)
    assert plan.kernel_takes_patches(patches)
    assert not plan.kernel_takes_patches(patches.double())
    with pytest.raises(ValueError, match="eval mode"):
        FastDynamicConv(layer.train())
    monkeypatch.setenv("HYBRID_CODEC_KERNEL", "0")
    assert not plan.kernel_takes_patches(patches)


@needs_kernel
@pytest.mark.parametrize("record", ["export", "trace"])
def test_export_and_tracing_take_the_pytorch_path_and_match(record):
    """Export (ONNX, torch.export, TorchScript) records PyTorch operators: the kernel stays out of the graph."""
    layer = random_layer(4, 6, 3, 1, "same", hidden=4).float().eval()
    plan = FastDynamicConv(layer)
    x = torch.randn(1, 4, 7, 9, generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated, still used by some
        if record == "export":
            recorded = torch.export.export(layer, (x,)).module()
            code = recorded.code
        else:
            recorded = torch.jit.trace(layer, x)
            code = str(recorded.graph)
        torch.testing.assert_close(recorded(x), plan(x), rtol=1e-5, atol=1e-5)
    assert "log" in code and "exp" in code


@needs_kernel
def test_kernel_refuses_sizes_it_cannot_take():
    buffer = torch.zeros(1024)
    ptr = buffer.data_ptr()
    with pytest.raises(ValueError, match="sizes"):  # 10 patches: not whole 64-patch blocks
        fast._fast.mix(ptr, ptr, 10, 1, 1, 10, ptr, ptr, 1e-6, ptr, ptr, ptr, ptr, 1e-6, 1.0, 1)
    with pytest.raises(ValueError, match="sizes"):  # more hidden features than its buffers hold
        fast._fast.mix(ptr, ptr, 64, 1, 65, 64, ptr, ptr, 1e-6, ptr, ptr, ptr, ptr, 1e-6, 1.0, 1)


@needs_kernel
def test_codec_output_with_and_without_the_kernel(monkeypatch):
    """The shipped codec: latent codes at most one level apart, in a few places (the encoder's
    product on 16-bit weights), and decoded pixels at most one level apart."""
    from skimage.data import astronaut

    from hybrid_codec import load_codec

    codec = load_codec(device="cpu")
    image = astronaut()[:200, :360]  # a crop: strided, copied to whole rows for the 8-bit kernel
    latent = codec.encode(image)
    decoded = np.asarray(codec.decode(latent), dtype=int)
    pytorch_only(monkeypatch)
    reference_latent = codec.encode(image)
    reference = np.asarray(codec.decode(latent), dtype=int)
    code_change = (latent.codes.int() - reference_latent.codes.int()).abs()
    assert code_change.max() <= 1 and code_change.float().mean() < 2e-3
    assert np.abs(decoded - reference).max() <= 1
    assert (decoded != reference).mean() < 1e-3


def eight_bit_images(batch: int, height: int, width: int, channels: int = 3, seed: int = 9) -> torch.Tensor:
    """Random 8-bit images as an image array is seen: (B, C, H, W), channels-last in memory."""
    pixels = torch.randint(0, 256, (batch, height, width, channels), dtype=torch.uint8)
    return pixels.random_(0, 256, generator=torch.Generator().manual_seed(seed)).permute(0, 3, 1, 2)


# (in, out, kernel, batch, H, W, hidden): the encoder's geometry, sizes the windows do not divide,
# ragged patch counts (one patch, and not whole 64-patch blocks), batches, hidden sizes 1 to 64
PIXEL_GEOMETRIES = [
    pytest.param(3, 4, 8, 1, 64, 96, 14, id="encoder"),
    pytest.param(3, 4, 8, 2, 19, 21, 14, id="ragged-batch"),
    pytest.param(3, 4, 8, 1, 8, 8, 3, id="one-patch"),
    pytest.param(3, 4, 8, 3, 72, 200, 5, id="many-blocks"),
    pytest.param(4, 2, 2, 1, 30, 34, 1, id="k2-c4-hidden1"),
    pytest.param(3, 7, 4, 1, 40, 12, 64, id="k4-hidden64"),
]


@needs_kernel
@pytest.mark.parametrize("in_ch,out_ch,k,batch,height,width,hidden", PIXEL_GEOMETRIES)
def test_pixel_kernel_matches_the_pytorch_path(monkeypatch, in_ch, out_ch, k, batch, height, width, hidden):
    """8-bit images: the kernel's 16-bit integer product against PyTorch's float32 one."""
    layer = random_layer(in_ch, out_ch, k, k, 0, hidden=hidden, seed=hidden).float().eval()
    plan = FastDynamicConv(layer)
    x = eight_bit_images(batch, height, width, in_ch)
    with torch.inference_mode():
        assert plan.kernel_takes_pixels(x)
        got = plan(x, 1 / 255)
        pytorch_only(monkeypatch)
        expected = plan(x, 1 / 255)
    assert got.shape == expected.shape == (batch, out_ch, height // k, width // k)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@needs_kernel
def test_pixel_kernel_output_does_not_depend_on_thread_count():
    layer = random_layer(3, 4, 8, 8, 0, hidden=14).float().eval()
    plan = FastDynamicConv(layer)
    x = eight_bit_images(1, 80, 168)  # 210 patches: both threads get blocks, the last one ragged
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = plan(x, 1 / 255)
            torch.set_num_threads(2)
            two = plan(x, 1 / 255)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_pixel_kernel_sums_cannot_overflow(monkeypatch):
    """White pixels times all-positive weights: the largest sums the 32-bit integers can meet. With
    324-value patches, full 16-bit weights would overflow them (324 * 255 * 32767 > 2**31)."""
    layer = random_layer(4, 4, 9, 9, 0, hidden=6).float().eval()
    plan = FastDynamicConv(layer)
    with torch.no_grad():
        for p in (layer.dense1.weight, layer.kernel_weight, layer.kernel_bias, layer.similar_conv.weight):
            p.uniform_(0.9, 1.0)
    x = torch.full((1, 18, 27, 4), 255, dtype=torch.uint8).permute(0, 3, 1, 2)
    with torch.inference_mode():
        weights = plan.weights(True, 1 / 255)
        integers, row_scale, _ = fast.integer_weights(weights.linear)
        assert integers.view(torch.int16).abs().max().item() * 255 * layer.patch_size < 2**31
        got = plan(x, 1 / 255)
        pytorch_only(monkeypatch)
        expected = plan(x, 1 / 255)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_pixel_weights_round_each_row_to_16_bits():
    layer = random_layer(3, 4, 8, 8, 0, hidden=5).float().eval()
    plan = FastDynamicConv(layer)
    weight = plan.weights(True, 1 / 255).linear
    if fast._fast is None:
        pytest.skip("the kernel is not built")
    packed, row_scale, row_bias = fast.integer_weights(weight)
    rows, p = weight.shape[0], layer.patch_size
    tile = fast._fast.TILE
    # undo the packing: (tiles, pairs, TILE) of (w0, w2), (w1, w3) pairs -> (rows, P) integers
    pairs = packed.transpose(1, 2).reshape(-1, p // 2)[:rows]
    integers = pairs.contiguous().view(torch.int16).view(rows, p // 4, 2, 2).transpose(-1, -2).reshape(rows, p)
    assert packed.shape == (-(-rows // tile), p // 2, tile)
    assert integers.abs().amax(1).eq(2**15 - 1).all()  # every row uses the whole 16-bit range
    assert torch.equal(row_bias, weight[:, p])
    error = (integers.double() * row_scale[:, None].double() - weight[:, :p].double()).abs()
    assert (error <= row_scale[:, None].double() * 0.5001).all()  # rounded, not truncated


@needs_kernel
def test_pixel_kernel_is_used_only_where_it_applies(monkeypatch):
    layer = random_layer(3, 4, 8, 8, 0, hidden=5).float().eval()
    plan = FastDynamicConv(layer)
    x = eight_bit_images(1, 16, 24)
    with torch.inference_mode():
        assert plan.kernel_takes_pixels(x)
        assert not plan.kernel_takes_pixels(x.float())  # float images: the patches path
        assert not plan.kernel_takes_pixels(x.contiguous())  # channel-first pixels
        layer3 = random_layer(3, 4, 3, 3, 0, hidden=5).float().eval()
        plan3 = FastDynamicConv(layer3)  # window rows of 9 bytes
        assert not plan3.kernel_takes_pixels(eight_bit_images(1, 9, 9))
        monkeypatch.setenv("HYBRID_CODEC_KERNEL", "0")
        assert not plan.kernel_takes_pixels(x)


@needs_kernel
def test_pixel_kernel_refuses_sizes_it_cannot_take():
    buffer = torch.zeros(4096)
    ptr = buffer.data_ptr()

    def call(batch, height, width, channels, k, rows, out_stride, out_channels, hidden):
        fast._fast.pixel_mix(
            ptr, batch, height, width, channels, k, ptr, ptr, ptr, rows, ptr, out_stride, out_channels, hidden,
            ptr, ptr, 1e-6, ptr, ptr, ptr, ptr, 1e-6, 1.0, 1, True,
        )  # fmt: skip

    with pytest.raises(ValueError, match="sizes"):  # window rows of 9 bytes, not whole 4-byte words
        call(1, 9, 9, 3, 3, 2 * 4 * 5 + 8, 64, 4, 5)
    with pytest.raises(ValueError, match="sizes"):  # rows that do not fit the layer
        call(1, 8, 8, 3, 8, 7, 64, 4, 5)
    with pytest.raises(ValueError, match="sizes"):  # an output row too short for the padded block
        call(1, 8, 8, 3, 8, 2 * 4 * 5 + 8, 10, 4, 5)
    with pytest.raises(ValueError, match="sizes"):  # an image smaller than one window
        call(1, 4, 8, 3, 8, 2 * 4 * 5 + 8, 64, 4, 5)


@needs_kernel
@pytest.mark.parametrize("height,width", [(64, 96), (61, 93)], ids=["multiple-of-8", "padded"])
def test_encoding_an_image_array_takes_the_eight_bit_kernel(monkeypatch, height, width):
    """Whole arrays, crops of larger ones and sizes that need padding all reach `pixel_mix`: a
    regression here would not fail any output check, only make encoding several times slower."""
    from hybrid_codec import load_codec

    codec = load_codec(device="cpu")
    calls = []
    original = FastDynamicConv._kernel_from_pixels
    monkeypatch.setattr(FastDynamicConv, "_kernel_from_pixels", lambda *args: calls.append(1) or original(*args))
    image = np.random.default_rng(0).integers(0, 256, (height + 10, width + 10, 3), dtype=np.uint8)
    for array in (image[:height, :width].copy(), image[5 : 5 + height, 3 : 3 + width]):
        codec.encode(array)
    assert len(calls) == 2
