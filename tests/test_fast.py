"""fast.py against the plain layer: the folded PyTorch path everywhere, and each variant of the
compiled kernel (_fast.c) that this CPU runs against it."""

from __future__ import annotations

import functools
import platform
import sys
import warnings

import numpy as np
import pytest
import torch
from test_layers import GEOMETRIES as LAYER_GEOMETRIES
from test_layers import random_layer

from hybrid_codec import fast
from hybrid_codec.errors import CodecError
from hybrid_codec.fast import FastDynamicConv
from hybrid_codec.layers import hybrid_activation

needs_kernel = pytest.mark.skipif(fast._fast is None, reason="the kernel is not built")
RUNNABLE = fast._fast.VARIANTS if fast._fast is not None else ()


@pytest.fixture(params=RUNNABLE or [pytest.param(None, marks=needs_kernel)])
def variant(request, monkeypatch) -> str:
    """Each kernel variant this CPU runs in turn, chosen as a user would (HYBRID_CODEC_KERNEL)."""
    monkeypatch.setenv("HYBRID_CODEC_KERNEL", request.param)
    assert fast.kernel_variant() == request.param
    return request.param


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


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        return next((set(line.split(":")[1].split()) for line in cpuinfo if line.startswith("flags")), set())


@needs_kernel
def test_the_variants_follow_the_cpu():
    """Every variant the CPU can execute is offered, best first; plain C runs on any CPU."""
    assert fast._fast.VARIANTS[-1] == "portable"
    assert list(fast._fast.VARIANTS) == [v for v in fast.KERNEL_VARIANTS if v in fast._fast.VARIANTS]
    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        flags = cpu_flags()
        expected = ["avx512"] if {"avx512f", "avx512bw", "avx512vl"} <= flags else []
        expected += ["avx2"] if {"avx2", "fma"} <= flags else []
        assert fast._fast.VARIANTS == (*expected, "portable")
        assert bool(fast._fast.VNNI) == ("avx512" in expected and "avx512_vnni" in flags)


@needs_kernel
def test_the_setting_chooses_the_variant(monkeypatch):
    """Unset or 1: the best; 0: none (PyTorch); a name: at most that variant; anything else: one clear error."""
    monkeypatch.delenv("HYBRID_CODEC_KERNEL", raising=False)
    assert fast.kernel_variant() == fast._fast.VARIANTS[0] and fast.kernel_available()
    monkeypatch.setenv("HYBRID_CODEC_KERNEL", "0")
    assert fast.kernel_variant() is None and not fast.kernel_available()
    for name in fast.KERNEL_VARIANTS:
        monkeypatch.setenv("HYBRID_CODEC_KERNEL", name)
        lower = fast.KERNEL_VARIANTS[fast.KERNEL_VARIANTS.index(name) :]
        assert fast.kernel_variant() == next(v for v in RUNNABLE if v in lower)
    monkeypatch.setenv("HYBRID_CODEC_KERNEL", "AVX2 ")
    assert fast.kernel_variant() == ("avx2" if "avx2" in RUNNABLE else "portable")
    monkeypatch.setenv("HYBRID_CODEC_KERNEL", "sse9")
    with pytest.raises(CodecError, match="HYBRID_CODEC_KERNEL"):
        fast.kernel_variant()


@needs_kernel
def test_the_kernel_refuses_a_variant_it_cannot_run():
    buffer = torch.zeros(64)
    with pytest.raises(RuntimeError, match="no kernel variant named sse9"):
        fast._fast.activation("sse9", buffer.data_ptr(), buffer.data_ptr(), 64, 1.0, 0.0, 1e-6)
    for name in set(fast.KERNEL_VARIANTS) - set(RUNNABLE):
        with pytest.raises(RuntimeError, match="cannot run"):
            fast._fast.activation(name, buffer.data_ptr(), buffer.data_ptr(), 64, 1.0, 0.0, 1e-6)


# (in, out, kernel, stride, padding, H, W, hidden): the decoder's and encoder's geometries, ragged
# patch counts (not multiples of the kernel's 64-patch blocks), hidden sizes from 1 to the maximum
GEOMETRIES = [
    pytest.param(4, 24, 3, 1, "same", 9, 13, 22, id="decoder-like"),
    pytest.param(3, 4, 8, 8, 0, 40, 72, 14, id="encoder-like"),
    pytest.param(3, 4, 8, 8, 0, 19, 21, 3, id="encoder-ragged"),
    pytest.param(2, 3, 5, 2, 1, 17, 23, 1, id="k5-s2-hidden1"),
    pytest.param(4, 2, 3, 1, "same", 16, 8, 64, id="hidden64"),
]


@pytest.mark.parametrize("in_ch,out_ch,k,stride,padding,height,width,hidden", GEOMETRIES)
def test_kernel_matches_the_pytorch_path(
    monkeypatch, variant, in_ch, out_ch, k, stride, padding, height, width, hidden
):
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


def test_kernel_output_does_not_depend_on_thread_count(variant):
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


def test_a_patch_output_does_not_depend_on_its_block(variant):
    """Two images in one batch put their patches in other blocks and groups of blocks than each
    image alone (930 patches each, 30 blocks in all): the same outputs, bit for bit."""
    layer = random_layer(4, 6, 3, 1, "same", hidden=5).float().eval()
    plan = FastDynamicConv(layer)
    x = torch.randn(2, 4, 30, 31, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.equal(plan(x), torch.cat([plan(x[:1]), plan(x[1:])]))


EDGES = [float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 1e30, 0.0, -0.0, 1e-40, -1e-40, 1e-6, 0.5, 2.0, -3.0]


@pytest.mark.parametrize("power,scale", [(1.0, 1.0), (0.25, 2.0), (4.0, 1.0), (4.0, -0.5), (2.7, 1e-3), (0.1, 9.0)])
def test_activation_matches_pytorch_on_edge_values(variant, power, scale):
    """NaN -> 0, overflow -> the largest float with the input's sign, powers clamped, like the formula."""
    x = torch.tensor(EDGES + torch.randn(50, generator=torch.Generator().manual_seed(6)).mul(30).tolist())
    got = fast.kernel_activation(x, power, scale, 1e-6, variant)
    expected = hybrid_activation(x, torch.tensor(power), torch.tensor(scale), 1e-6)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))


def test_activation_relative_error_over_the_whole_range(variant):
    """Every float from 1e-30 to 1e30 and back, each power: within 2e-6 of float64's exact value."""
    x = torch.logspace(-30, 30, 20000, dtype=torch.float64)
    x = torch.cat([x, -x, torch.rand(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 4])
    for power in (0.25, 0.6, 1.0, 1.9, 3.3, 4.0):
        exact = hybrid_activation(
            x, torch.tensor(power, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64), 1e-6
        )
        finite = exact.abs() < 3e38
        got = fast.kernel_activation(x.float(), power, 1.3, 1e-6, variant).double()
        relative = ((got - exact).abs() / exact.abs())[finite]
        assert relative.max() < 2e-6, (power, relative.max().item())


@needs_kernel
def test_zero_scale_is_left_to_pytorch(monkeypatch):
    layer = random_layer(4, 6, 3, 1, "same").float().eval()
    with torch.no_grad():
        layer.dense2.scale[0, 0] = 0.0
    plan = FastDynamicConv(layer)  # reads the scales once, here
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
            code = str(recorded.inlined_graph)  # the layer's own graph calls its submodules' ones
        torch.testing.assert_close(recorded(x), plan(x), rtol=1e-5, atol=1e-5)
    assert "log" in code and "exp" in code


@needs_kernel
def test_kernel_refuses_sizes_it_cannot_take():
    buffer = torch.zeros(1024)
    ptr = buffer.data_ptr()
    mix = functools.partial(fast._fast.dynamic_from_patches, RUNNABLE[0], ptr, 5)
    rest = (ptr, ptr, 1e-6, ptr, ptr, ptr, ptr, 1e-6, 1.0, 1)
    with pytest.raises(ValueError, match="sizes"):  # 10 patches: not whole 64-patch blocks
        mix(10, ptr, 1, ptr, 10, 1, 1, *rest)
    with pytest.raises(ValueError, match="sizes"):  # more hidden features than its buffers hold
        mix(64, ptr, 22, ptr, 64, 1, 65, *rest)
    with pytest.raises(ValueError, match="sizes"):  # weights in fewer tiles than 2H + 2 rows need
        mix(64, ptr, 1, ptr, 64, 1, 3, *rest)
    mix(64, ptr, 1, ptr, 64, 1, 1, *rest)  # the sizes it takes: a 1024-value buffer holds them all


def test_codec_output_with_and_without_the_kernel(monkeypatch, variant):
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


@pytest.mark.parametrize("in_ch,out_ch,k,batch,height,width,hidden", PIXEL_GEOMETRIES)
def test_pixel_kernel_matches_the_pytorch_path(monkeypatch, variant, in_ch, out_ch, k, batch, height, width, hidden):
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


def test_pixel_kernel_output_does_not_depend_on_thread_count(variant):
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


def test_pixel_kernel_sums_cannot_overflow(monkeypatch, variant):
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


def unpacked(packed: torch.Tensor, rows: int, p: int) -> torch.Tensor:
    """The packing undone: (tiles, pairs, TILE) of (w0, w2), (w1, w3) pairs -> (rows, P) integers."""
    pairs = packed.transpose(1, 2).reshape(-1, p // 2)[:rows]
    return pairs.contiguous().view(torch.int16).view(rows, p // 4, 2, 2).transpose(-1, -2).reshape(rows, p)


def test_pixel_weights_round_each_row_to_16_bits():
    layer = random_layer(3, 4, 8, 8, 0, hidden=5).float().eval()
    plan = FastDynamicConv(layer)
    weight = plan.weights(True, 1 / 255).linear
    if fast._fast is None:
        pytest.skip("the kernel is not built")
    packed, row_scale, row_bias = fast.integer_weights(weight)
    rows, p = weight.shape[0], layer.patch_size
    tile = fast._fast.TILE
    integers = unpacked(packed, rows, p)
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
        fast._fast.dynamic_from_pixels(
            RUNNABLE[0], ptr, batch, height, width, channels, k, ptr, ptr, ptr, rows, ptr, out_stride, out_channels,
            hidden,
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


@pytest.mark.parametrize("height,width", [(64, 96), (61, 93)], ids=["multiple-of-8", "padded"])
def test_encoding_an_image_array_takes_the_eight_bit_kernel(monkeypatch, variant, height, width):
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


@needs_kernel
@pytest.mark.parametrize("in_ch,out_ch,k,batch,height,width,hidden", PIXEL_GEOMETRIES)
def test_every_variant_gives_the_same_integer_sums(in_ch, out_ch, k, batch, height, width, hidden):
    """The integer product's 32-bit sums, bit for bit: every variant the CPU runs (AVX-512 with and
    without VNNI), and the exact sums of the unpacked 16-bit weights times the pixels in int64."""
    layer = random_layer(in_ch, out_ch, k, k, 0, hidden=hidden, seed=hidden).float().eval()
    plan = FastDynamicConv(layer)
    x = eight_bit_images(batch, height, width, in_ch, seed=hidden)
    weights = plan.weights(True, 1 / 255)
    packed, _, _ = fast.integer_weights(weights.linear)
    rows, p = weights.linear.shape[0], layer.patch_size
    n = batch * (height // k) * (width // k)
    blocks = -(-n // fast.BLOCK)
    exact = plan.patches(x, True, torch.float64)[:, :p].long() @ unpacked(packed, rows, p).long().T  # (n, rows)
    runs = [(v, vnni) for v in RUNNABLE for vnni in ((True, False) if v == "avx512" and fast._fast.VNNI else (False,))]
    for name, vnni in runs:
        sums = torch.full((blocks, rows, fast.BLOCK), -1, dtype=torch.int32)
        fast._fast.pixel_sums(
            name, x.data_ptr(), batch, height, width, in_ch, k, packed.data_ptr(), rows, out_ch, hidden,
            sums.data_ptr(), vnni,
        )  # fmt: skip
        got = sums.transpose(1, 2).reshape(-1, rows)[:n]
        assert torch.equal(got.long(), exact), (name, vnni)


@pytest.mark.skipif(not {"avx512", "avx2"} <= set(RUNNABLE), reason="this CPU does not run both avx512 and avx2")
def test_avx2_gives_the_avx512_results_exactly():
    """The same arithmetic on 8 lanes: the exponent split and 2^n, done on the floats' bits, round as
    AVX-512's instructions do, down to subnormal inputs."""
    x = torch.logspace(-38, 38, 30000, dtype=torch.float64).float()
    x = torch.cat(
        [x, -x, torch.tensor(EDGES + [1e-45, 1.2e-38]), torch.randn(5000, generator=torch.Generator().manual_seed(9))]
    )
    for power, scale, eps in [(0.25, 1.3, 1e-6), (1.0, -0.5, 1e-6), (4.0, 9.0, 1e-6), (2.7, 1e-3, 1e-42)]:
        avx512, avx2 = (fast.kernel_activation(x, power, scale, eps, v) for v in ("avx512", "avx2"))
        assert torch.equal(avx512.view(torch.int32), avx2.view(torch.int32)), (power, scale, eps)


@pytest.mark.skipif(not {"avx512", "avx2"} <= set(RUNNABLE), reason="this CPU does not run both avx512 and avx2")
def test_avx2_gives_the_avx512_layer_exactly(monkeypatch):
    """The float product too: each row summed in the same order, one fused multiply-add a value."""
    layer = random_layer(4, 24, 3, 1, "same", hidden=11).float().eval()
    x = torch.randn(1, 4, 40, 37, generator=torch.Generator().manual_seed(8))
    outputs = []
    for name in ("avx512", "avx2"):
        monkeypatch.setenv("HYBRID_CODEC_KERNEL", name)
        with torch.inference_mode():
            outputs.append(FastDynamicConv(layer)(x))
    assert torch.equal(*outputs)


def test_decode_pixels_are_decode_in_8_bits(variant):
    """The codec's 8-bit output, shuffled and rounded in place, is `decode`'s float image rounded."""
    from conftest import TINY

    from hybrid_codec.models import Autoencoder

    torch.manual_seed(3)
    plan = fast.FastAutoencoder(Autoencoder(TINY).eval())
    latents = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(4)) * 3
    with torch.inference_mode():
        expected = (plan.decode(latents) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        got = plan.decode_pixels(latents)
    assert got.shape == (2, 40, 56, 3) and got.is_contiguous()
    assert torch.equal(got, expected)
    assert 0 < (got == 0).float().mean() < 1 and 0 < (got == 255).float().mean() < 1  # both clamps exercised
