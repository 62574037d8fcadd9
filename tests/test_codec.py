"""The codec API: any size and kind of image in, a latent out, and back to exactly the original size."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import TINY, smooth_image
from PIL import Image

from hybrid_codec import Codec, CodecError, Latent, load_codec, zoo
from hybrid_codec import images as images_module
from hybrid_codec.codec import pick_device
from hybrid_codec.images import tensor_to_image
from hybrid_codec.models import Autoencoder


@pytest.fixture(scope="module")
def codec() -> Codec:
    torch.manual_seed(0)
    return Codec(Autoencoder(TINY))


@pytest.mark.parametrize("height,width", [(1, 1), (7, 13), (8, 8), (9, 9), (16, 24), (769, 513)])
def test_any_size_round_trips_to_exactly_that_size(codec, height, width):
    latent = codec.encode(smooth_image(height, width))
    assert (latent.height, latent.width) == (height, width)
    assert latent.codes.shape == (4, -(-height // 8), -(-width // 8))
    decoded = codec.decode(Latent.from_bytes(latent.to_bytes()))
    assert decoded.mode == "RGB"
    assert decoded.size == (width, height)


def test_decode_from_a_latent_file_path(codec, tmp_path):
    path = codec.encode(smooth_image(10, 12)).save(tmp_path / "x.latent.pt")
    assert codec.decode(path).size == (12, 10)
    assert codec.decode(str(path)).size == (12, 10)


def pil_inputs(rgb: np.ndarray) -> dict[str, Image.Image]:
    gray = Image.fromarray(rgb[..., 0])
    return {
        "RGB": Image.fromarray(rgb),
        "L": gray,
        "LA": Image.merge("LA", (gray, gray)),
        "RGBA": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "P": Image.fromarray(rgb).convert("P"),
        "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
    }


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "I;16"])
def test_pil_image_of_any_mode_encodes(codec, mode):
    image = pil_inputs(smooth_image(13, 10))[mode]
    assert image.mode == mode
    latent = codec.encode(image)
    assert isinstance(latent, Latent)
    assert codec.decode(latent).size == (10, 13)


def test_sixteen_bit_gray_encodes_like_its_eight_bit_version(codec):
    rgb = smooth_image(13, 10)
    inputs = pil_inputs(rgb)
    assert torch.equal(codec.encode(inputs["I;16"]).codes, codec.encode(inputs["L"]).codes)


def test_every_input_kind_gives_the_same_latent(codec, tmp_path):
    rgb = smooth_image(12, 17, seed=4)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    reference = codec.encode(rgb)
    for source in (tmp_path / "img.png", str(tmp_path / "img.png"), Image.fromarray(rgb)):  # all 8-bit
        latent = codec.encode(source)
        assert torch.equal(latent.codes, reference.codes)
        assert torch.equal(latent.low, reference.low) and torch.equal(latent.step, reference.step)
    # a float tensor takes the float path: x / 255 is rounded before the product, not folded into it,
    # and the 8-bit kernel (fast.dynamic_from_pixels) rounds the weights to 16 bits: the same latent to a
    # small fraction of one 8-bit step
    latent = codec.encode(tensor)
    assert (latent.codes.int() - reference.codes.int()).abs().max() <= 1
    assert (latent.codes != reference.codes).float().mean() < 0.01
    torch.testing.assert_close(latent.low, reference.low, rtol=0, atol=0.1 * reference.step.min().item())
    torch.testing.assert_close(latent.step, reference.step, rtol=1e-3, atol=0)


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["kernel", "pytorch"])
def test_uint8_tensor_encodes_like_its_float_version(codec, monkeypatch, kernel):
    """8-bit pixels are read as x / 255 by folding 1/255 into the weights: the same latents."""
    monkeypatch.setenv("HYBRID_CODEC_KERNEL", kernel)
    pixels = torch.from_numpy(smooth_image(37, 29, seed=6)).permute(2, 0, 1)[None]
    got, expected = codec.encode_tensor(pixels), codec.encode_tensor(pixels.float() / 255)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_grayscale_array_encodes_like_gray_rgb(codec):
    gray = smooth_image(9, 11)[..., 1]
    assert torch.equal(codec.encode(gray).codes, codec.encode(np.dstack([gray] * 3)).codes)


def test_batch_tensor_gives_a_list(codec):
    batch = torch.rand(3, 3, 10, 9)
    latents = codec.encode(batch)
    assert isinstance(latents, list) and len(latents) == 3
    for latent, image in zip(latents, batch, strict=True):
        assert (latent.height, latent.width) == (10, 9)
        single = codec.encode(image)  # the same image alone: at most a rounding step apart
        assert (latent.codes.int() - single.codes.int()).abs().max() <= 1
        assert codec.decode(latent).size == (9, 10)
    one = codec.encode(batch[:1])
    assert isinstance(one, list) and len(one) == 1  # a batch of one is still a batch


@pytest.mark.parametrize(
    "bad,message",
    [
        pytest.param(torch.full((3, 8, 8), float("nan")), "NaN", id="nan"),
        pytest.param(torch.rand(2, 8, 8), r"\(3, H, W\)", id="two-channels"),
        pytest.param(torch.rand(1, 4, 8, 8), r"\(3, H, W\)", id="rgba-tensor"),
        pytest.param(torch.rand(8, 8), r"\(3, H, W\)", id="2d-tensor"),
        pytest.param(np.zeros((8, 8, 5), np.uint8), "HxW", id="five-channel-array"),
        pytest.param(3.5, "cannot encode a float", id="number"),
    ],
)
def test_bad_inputs_refused(codec, bad, message):
    with pytest.raises(CodecError, match=message):
        codec.encode(bad)


def test_image_over_max_pixels_refused(codec, monkeypatch, tmp_path):
    monkeypatch.setattr(images_module, "MAX_PIXELS", 64)
    rgb = smooth_image(9, 8)  # 72 pixels
    Image.fromarray(rgb).save(tmp_path / "big.png")
    for source in (rgb, Image.fromarray(rgb), tmp_path / "big.png", torch.rand(3, 9, 8), torch.rand(2, 3, 8, 9)):
        with pytest.raises(CodecError, match="too large"):
            codec.encode(source)
    assert codec.encode(rgb[:8]).height == 8


def test_corrupt_truncated_and_missing_images_refused(codec, tmp_path):
    Image.fromarray(smooth_image(40, 40)).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    for name in ("cut.png", "junk.png", "missing.png"):
        with pytest.raises(CodecError, match=name):
            codec.encode(tmp_path / name)


def test_encode_tensor_and_decode_tensor_shapes(codec):
    latents = codec.encode_tensor(torch.rand(2, 3, 17, 30))
    assert latents.shape == (2, 4, 3, 4) and latents.dtype == torch.float32
    images = codec.decode_tensor(latents)
    assert images.shape == (2, 3, 24, 32)
    assert images.min() >= 0 and images.max() <= 1
    assert codec.encode_tensor(torch.rand(1, 3, 1, 1)).shape == (1, 4, 1, 1)


def test_encode_tensor_pads_by_repeating_the_edge(codec):
    image = torch.rand(1, 3, 13, 10)
    padded = torch.nn.functional.pad(image, (0, 6, 0, 3), mode="replicate")
    assert torch.equal(codec.encode_tensor(image), codec.encode_tensor(padded))


@pytest.mark.parametrize(
    "latents,message",
    [
        pytest.param(torch.zeros(1, 3, 2, 2), r"expected latents \(B, 4, h, w\)", id="channels"),
        pytest.param(torch.zeros(4, 2, 2), r"expected latents \(B, 4, h, w\)", id="unbatched"),
        pytest.param(torch.full((1, 4, 2, 2), float("nan")), "NaN or infinite", id="nan"),
        pytest.param(torch.full((1, 4, 2, 2), float("inf")), "NaN or infinite", id="inf"),
    ],
)
def test_decode_tensor_refuses_bad_latents(codec, latents, message):
    with pytest.raises(CodecError, match=message):
        codec.decode_tensor(latents)


def test_roundtrip_tensor_equals_decoding_a_latent_file(codec, tmp_path):
    rgb = smooth_image(21, 35, seed=7)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # what `encode` makes of the array: 8-bit, channels-last
    in_memory = codec.roundtrip_tensor(pixels)
    assert in_memory.shape == (1, 3, 21, 35)
    tensor_to_image(in_memory).save(tmp_path / "memory.png")
    path = codec.encode(rgb).save(tmp_path / "img.latent.pt")
    codec.decode(Latent.load(path)).save(tmp_path / "file.png")
    memory, file = (np.asarray(Image.open(tmp_path / name)) for name in ("memory.png", "file.png"))
    assert memory.shape == file.shape == (21, 35, 3)
    assert np.array_equal(memory, file)


def test_quantization_changes_the_output(codec):
    """Guards the round-trip test: it must compare quantized paths, not two unquantized ones."""
    tensor = torch.rand(1, 3, 16, 16)
    plain = codec.decode_tensor(codec.encode_tensor(tensor))
    assert not torch.equal(codec.roundtrip_tensor(tensor), plain)


def test_load_codec_from_a_weights_path(tiny_weights):
    loaded = load_codec(tiny_weights, device="cpu")
    assert loaded.name == "tiny" and loaded.device == torch.device("cpu")
    assert not loaded.model.training
    assert loaded.weights_hash == Autoencoder.from_pretrained(tiny_weights).weights_hash()
    assert load_codec(str(tiny_weights), device="cpu").weights_hash == loaded.weights_hash


def test_load_codec_refuses_unknown_names_and_devices(tiny_weights, tmp_path):
    with pytest.raises(CodecError, match="neither a shipped model"):
        load_codec(tmp_path / "missing.safetensors", device="cpu")
    with pytest.raises(CodecError, match="unknown device"):
        load_codec(tiny_weights, device="tpu-please")


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(CodecError, match="CUDA is not available"):
            pick_device("cuda")


def test_shipped_names_resolve_to_the_weights_folder(tmp_path, monkeypatch, tiny_weights):
    monkeypatch.setattr(zoo, "weights_dir", lambda: tmp_path)
    with pytest.raises(CodecError, match="shipped weights 'photo' are missing"):
        zoo.resolve_weights(None)
    (tmp_path / "photo.safetensors").write_bytes(tiny_weights.read_bytes())
    assert zoo.resolve_weights(None) == tmp_path / "photo.safetensors"
    assert zoo.resolve_weights("photo") == tmp_path / "photo.safetensors"
    assert load_codec(device="cpu").name == "tiny"
    assert zoo.resolve_weights(tiny_weights) == tiny_weights


def test_encode_and_decode_do_not_import_diffusers(tiny_weights):
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        import hybrid_codec
        codec = hybrid_codec.load_codec({str(tiny_weights)!r}, device="cpu")
        latent = hybrid_codec.Latent.from_bytes(codec.encode(torch.rand(3, 9, 9)).to_bytes())
        assert codec.decode(latent).size == (9, 9)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers"))
        assert not heavy, heavy
        print("clean")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
