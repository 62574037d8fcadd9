"""Reading images of any mode into RGB tensors, sizes and errors, and tensors back into images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import smooth_image
from PIL import Image

from hybrid_codec import images
from hybrid_codec.errors import CodecError
from hybrid_codec.images import find_images, image_to_tensor, open_image, tensor_to_image, to_rgb


def as_uint8(tensor: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> HxWx3 uint8, exact for tensors that came from uint8."""
    assert tensor.dim() == 4 and tensor.shape[:2] == (1, 3)
    return (tensor[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture
def rgb():
    return smooth_image(11, 13, seed=3)


def test_rgb_array_pil_and_path_agree(rgb, tmp_path):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    from_array = image_to_tensor(rgb)
    assert from_array.shape == (1, 3, 11, 13) and from_array.dtype == torch.float32
    assert np.array_equal(as_uint8(from_array), rgb)
    assert torch.equal(image_to_tensor(Image.fromarray(rgb)), from_array)
    assert torch.equal(image_to_tensor(tmp_path / "a.png"), from_array)
    assert torch.equal(image_to_tensor(str(tmp_path / "a.png")), from_array)


def test_grayscale_becomes_three_equal_channels(rgb):
    gray = rgb[..., 0]
    for source in (Image.fromarray(gray, "L"), gray, gray[..., None]):
        tensor = image_to_tensor(source)
        assert tensor.shape == (1, 3, 11, 13)
        for c in range(3):
            assert np.array_equal(as_uint8(tensor)[..., c], gray)


def test_alpha_is_composited_over_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque: unchanged
    rgba[0, 1] = (0, 0, 0, 0)  # transparent: white
    rgba[0, 2] = (0, 0, 0, 128)  # half: grey
    expected = np.full((2, 3, 3), 255, np.uint8)
    expected[0, 0] = (200, 100, 50)
    expected[0, 2] = 127
    for source in (Image.fromarray(rgba, "RGBA"), rgba):
        got = as_uint8(image_to_tensor(source))
        assert np.abs(got.astype(int) - expected).max() <= 1, got


def test_la_image_is_composited_over_white():
    la = Image.fromarray(np.array([[[40, 255], [40, 0]]], np.uint8), "LA")
    assert as_uint8(image_to_tensor(la)).tolist() == [[[40, 40, 40], [255, 255, 255]]]


def test_palette_image_uses_its_colours_and_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    assert as_uint8(image_to_tensor(palette)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    palette.info["transparency"] = 1
    assert as_uint8(image_to_tensor(palette)).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_sixteen_bit_grayscale_is_scaled_down(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16)  # 0, 1, 128, 255 in 8 bits
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    expected = [[[v] * 3 for v in (0, 1, 128, 255)]]
    assert as_uint8(image_to_tensor(image)).tolist() == expected
    image.save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert as_uint8(image_to_tensor(tmp_path / "g16.png")).tolist() == expected


def test_sixteen_bit_arrays_are_scaled_down():
    rgb16 = np.array([[[0, 257, 65535]]], np.uint16)
    assert as_uint8(image_to_tensor(rgb16)).tolist() == [[[0, 1, 255]]]
    rgba16 = np.array([[[65535, 32896, 0, 65535], [0, 0, 0, 0]]], np.uint16)
    assert as_uint8(image_to_tensor(rgba16)).tolist() == [[[255, 128, 0], [255, 255, 255]]]


@pytest.mark.parametrize("mode", ["1", "CMYK", "YCbCr", "I", "F"])
def test_other_modes_become_rgb(mode, rgb):
    image = Image.fromarray(rgb).convert(mode)
    assert to_rgb(image).mode == "RGB"
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 3, 11, 13)
    assert 0 <= tensor.min() and tensor.max() <= 1


def test_float_tensors_pass_through_clamped():
    tensor = torch.rand(2, 3, 5, 7) * 1.4 - 0.2
    out = image_to_tensor(tensor)
    assert out.shape == (2, 3, 5, 7)
    assert torch.equal(out, tensor.clamp(0, 1))
    assert image_to_tensor(tensor[0]).shape == (1, 3, 5, 7)
    assert image_to_tensor(tensor.double()).dtype == torch.float64  # the codec casts to float32 itself


@pytest.mark.parametrize(
    "bad,message",
    [
        pytest.param(torch.full((3, 4, 4), float("nan")), "NaN or infinite", id="nan"),
        pytest.param(torch.tensor([[[float("inf")]]] * 3), "NaN or infinite", id="inf"),
        pytest.param(torch.rand(4, 5, 5), r"\(3, H, W\) or \(B, 3, H, W\)", id="four-channels"),
        pytest.param(torch.rand(5, 5), r"\(3, H, W\)", id="2d-tensor"),
        pytest.param(torch.rand(1, 1, 3, 5, 5), r"\(3, H, W\)", id="5d-tensor"),
        pytest.param(torch.rand(3, 0, 5), "empty image", id="empty-tensor"),
        pytest.param(torch.zeros(3, 4, 4, dtype=torch.uint8), "float tensor", id="uint8-tensor"),
        pytest.param(np.zeros((4, 4, 3), np.float32), "uint8", id="float-array"),
        pytest.param(np.zeros((4, 4, 4), np.float64), "uint8", id="float-rgba-array"),
        pytest.param(np.zeros((4, 4, 3), np.int64), "uint8", id="int64-array"),
        pytest.param(np.zeros((4, 4, 2), np.uint8), "HxW, HxWx3 or HxWx4", id="two-channel-array"),
        pytest.param(np.zeros((2, 4, 4, 3), np.uint8), "HxW, HxWx3 or HxWx4", id="4d-array"),
        pytest.param(np.zeros(5, np.uint8), "HxW, HxWx3 or HxWx4", id="1d-array"),
        pytest.param(np.zeros((0, 4, 3), np.uint8), "empty image", id="empty-array"),
        pytest.param([[0, 1], [2, 3]], "cannot encode a list", id="list"),
        pytest.param(b"\x89PNG", "cannot encode a bytes", id="bytes"),
    ],
)
def test_bad_inputs_refused(bad, message):
    with pytest.raises(CodecError, match=message):
        image_to_tensor(bad)


def test_image_over_max_pixels_refused(monkeypatch, tmp_path, rgb):
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    Image.fromarray(rgb).save(tmp_path / "big.png")  # 11 x 13 = 143 pixels
    sources = [rgb, rgb[..., 0], Image.fromarray(rgb), tmp_path / "big.png", torch.rand(3, 11, 13)]
    for source in sources:
        with pytest.raises(CodecError, match="too large"):
            image_to_tensor(source)
    assert image_to_tensor(rgb[:10, :10]).shape == (1, 3, 10, 10)  # 100 pixels: at the limit, accepted


def test_missing_file_and_folder_refused(tmp_path):
    with pytest.raises(CodecError, match="no such file"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(CodecError, match="is a folder"):
        image_to_tensor(tmp_path)


def test_truncated_png_refused(tmp_path):
    Image.fromarray(smooth_image(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    for cut in (8, 40, len(data) // 2, len(data) - 40):  # (the last few bytes hold no pixels: Pillow accepts those)
        path = tmp_path / f"cut{cut}.png"
        path.write_bytes(data[:cut])
        with pytest.raises(CodecError, match=f"cut{cut}.png: "):
            open_image(path)


def test_corrupt_and_foreign_files_refused(tmp_path):
    Image.fromarray(smooth_image(32, 32)).save(tmp_path / "good.png")
    data = bytearray((tmp_path / "good.png").read_bytes())
    data[100:140] = bytes(40)  # damage the compressed pixel data, keep the header
    (tmp_path / "damaged.png").write_bytes(bytes(data))
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("damaged.png", "text.png", "empty.jpg"):
        with pytest.raises(CodecError, match=name):
            image_to_tensor(tmp_path / name)


def test_tensor_to_image_inverts_image_to_tensor(rgb):
    image = tensor_to_image(image_to_tensor(rgb))
    assert image.mode == "RGB" and image.size == (13, 11)
    assert np.array_equal(np.asarray(image), rgb)
    assert np.array_equal(np.asarray(tensor_to_image(image_to_tensor(rgb)[0])), rgb)
    assert np.asarray(tensor_to_image(torch.full((3, 2, 2), 2.0))).tolist() == [[[255] * 3] * 2] * 2


def test_find_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.TIFF", "notes.txt", "sub/e.latent.pt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a folder with an image suffix is not an image
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.TIFF"]
    with pytest.raises(CodecError, match="no such folder"):
        find_images(tmp_path / "missing")
