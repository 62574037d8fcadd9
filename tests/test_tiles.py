"""Huge images in tiles: bit for bit what untiled coding gives, one tile of float work at a time,
and the size limit a memory guard that --max-pixels raises, with Pillow's bomb check kept."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import TINY, smooth_image
from PIL import Image
from typer.testing import CliRunner

from hybrid_codec import images as images_module
from hybrid_codec.cli import app
from hybrid_codec.codec import Codec, load_codec
from hybrid_codec.errors import CodecError
from hybrid_codec.images import open_image
from hybrid_codec.models import Autoencoder
from hybrid_codec.tiles import decode_tiled, encode_tiled, grid

HEIGHT, WIDTH = 203, 301  # odd: the last row and column of tiles are partial, and padded


@pytest.fixture(scope="module")
def photo():
    return load_codec("photo", "cpu")


@pytest.fixture(scope="module")
def picture():
    return Image.fromarray(smooth_image(HEIGHT, WIDTH, seed=3))


def test_grid_covers_the_image_once():
    seen = np.zeros((HEIGHT, WIDTH), int)
    for top, left, bottom, right in grid(HEIGHT, WIDTH, 64):
        seen[top:bottom, left:right] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("tile", [32, 64, 104])
def test_tiled_coding_is_bit_for_bit_untiled(photo, picture, tile):
    photo.tile = None
    try:
        whole = photo.encode(picture)
        whole_latents = photo.encode_tensor(torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None])
        whole_data = photo.to_bytes(whole)
        whole_image = np.asarray(photo.decode(whole_data))
        photo.tile = tile
        assert photo.tiles(picture)
        tiled = photo.encode(picture)
        assert torch.equal(encode_tiled(photo.encode_tensor, picture, tile), whole_latents)
        assert torch.equal(photo.encode(np.asarray(picture)).codes, whole.codes)  # an array is tiled too
        assert torch.equal(tiled.codes, whole.codes) and photo.to_bytes(tiled) == whole_data
        decoded = photo.decode(whole_data)
        assert decoded.size == (WIDTH, HEIGHT)
        assert np.array_equal(np.asarray(decoded), whole_image)
    finally:
        photo.tile = 2048


def test_a_wider_decoder_kernel_gets_a_wider_halo(picture):
    torch.manual_seed(0)
    codec = Codec(Autoencoder(TINY.__class__(**{**TINY.__dict__, "decoder_kernel": 5})), tile=None)
    latents = codec.encode_tensor(torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None])
    whole = np.asarray(codec.decode_tensor(latents)[0, :, :HEIGHT, :WIDTH].mul(255).round().byte().permute(1, 2, 0))
    tiled = decode_tiled(codec.decode_tensor, latents, HEIGHT, WIDTH, 48, halo=2)
    assert np.array_equal(np.asarray(tiled), whole)
    too_narrow = decode_tiled(codec.decode_tensor, latents, HEIGHT, WIDTH, 48, halo=1)
    assert not np.array_equal(np.asarray(too_narrow), whole)  # the halo is what makes tiles exact


def test_float_work_is_one_tile_at_a_time(photo, picture, monkeypatch):
    sizes = []
    for name in ("encode_tensor", "decode_tensor"):
        original = getattr(photo, name)

        def recording(x, original=original):
            sizes.append(x.shape[-2] * x.shape[-1] * (64 if x.shape[1] == 4 else 1))  # in pixels
            return original(x)

        monkeypatch.setattr(photo, name, recording)
    photo.tile = 64
    try:
        photo.decode(photo.encode(picture))
    finally:
        photo.tile = 2048
    assert len(sizes) > 2 * 8
    assert max(sizes) <= (64 + 2 * 8) ** 2  # a tile and its one-latent halo, never the image


def test_max_pixels_is_a_guard_the_codec_raises(tmp_path, picture, photo):
    path = tmp_path / "a.png"
    picture.save(path)
    small = Codec(photo.model, max_pixels=WIDTH * HEIGHT - 1)
    with pytest.raises(CodecError, match=rf"{WIDTH}x{HEIGHT} is too large \(at most {WIDTH * HEIGHT - 1:,} pixels"):
        small.encode(path)
    data = photo.compress(picture)
    with pytest.raises(CodecError, match="latent's image: 301x203 is too large"):
        small.decompress(data)  # refused from the header, before the payload is decoded
    assert Codec(photo.model, max_pixels=WIDTH * HEIGHT).decompress(data).size == (WIDTH, HEIGHT)
    with pytest.raises(CodecError, match="max_pixels must be a positive integer"):
        Codec(photo.model, max_pixels=0)


def test_raising_the_limit_raises_pillows_bomb_limit_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's bomb limit, low: a 1,600-pixel image trips it
    monkeypatch.setattr(images_module, "MAX_PIXELS", 10**9)
    path = tmp_path / "a.png"
    Image.fromarray(smooth_image(40, 40)).save(path)
    assert open_image(path, max_pixels=1600).size == (40, 40)  # raised for this file only
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(CodecError, match="too large for the limit of 1,599 pixels"):
        open_image(path, max_pixels=1599)
    big = tmp_path / "big.png"
    Image.fromarray(smooth_image(100, 100)).save(big)
    with pytest.raises(CodecError, match="too large for the limit of 2,000 pixels .*decompression bomb"):
        open_image(big, max_pixels=2000)  # Pillow's own check, at the raised limit, refuses it first
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**6)
    with pytest.raises(CodecError, match="40x40 is too large"):
        open_image(path, max_pixels=1599)  # under Pillow's limit, the codec's check names the size


def test_cli_max_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "MAX_PIXELS", 100)
    path = tmp_path / "a.png"
    Image.fromarray(smooth_image(40, 56)).save(path)
    runner = CliRunner()
    refused = runner.invoke(app, ["encode", str(path), "--device", "cpu"])
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert re.search("56x40 is too large .*--max-pixels raises", refused.stderr)
    assert not (tmp_path / "a.hyb").exists()
    args = ["--device", "cpu", "--max-pixels", "2240"]
    assert runner.invoke(app, ["encode", str(path), *args]).exit_code == 0
    refused = runner.invoke(app, ["decode", str(tmp_path / "a.hyb"), "--device", "cpu"])
    assert refused.exit_code == 1 and "too large" in refused.stderr and not (tmp_path / "a.decoded.png").exists()
    assert runner.invoke(app, ["decode", str(tmp_path / "a.hyb"), *args]).exit_code == 0
    assert Image.open(tmp_path / "a.decoded.png").size == (56, 40)
    assert runner.invoke(app, ["roundtrip", str(path), *args]).exit_code == 0
    bad = runner.invoke(app, ["encode", str(path), "--device", "cpu", "--max-pixels", "0", "--force"])
    assert bad.exit_code == 1 and "max_pixels must be a positive integer" in bad.stderr
