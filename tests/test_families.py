"""The layer families of CodecConfig.family: budgets, configs, the codec's plain path, tiles, training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import TINY, smooth_image
from PIL import Image
from typer.testing import CliRunner

from hybrid_codec.cli import app
from hybrid_codec.codec import Codec, load_codec
from hybrid_codec.config import FAMILIES
from hybrid_codec.errors import CodecError
from hybrid_codec.fast import FastAutoencoder
from hybrid_codec.layers import DyConv2d, DynamicConv, DyNetConv2d
from hybrid_codec.models import Autoencoder, CodecConfig, weights_bytes
from hybrid_codec.tiles import encode_tiled

LAYERS = {"hybrid": DynamicConv, "dycnn": DyConv2d, "dynet": DyNetConv2d, "conv": torch.nn.Conv2d}
# the sizes of docs/layers.md's comparison: each family as close to hybrid's budget as its K allows
COMPARED = {"hybrid": (14, 22), "dycnn": (30, 65), "dynet": (28, 34), "conv": (1, 1)}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_fits_the_budget_at_its_default_and_compared_sizes(family):
    for encoder, decoder in ((14, 22), COMPARED[family]):
        model = Autoencoder(CodecConfig(family=family, encoder_hidden=encoder, decoder_hidden=decoder))
        assert isinstance(model.encoder.conv, LAYERS[family]) and isinstance(model.decoder.conv, LAYERS[family])
        assert weights_bytes(model.encoder) <= 100_000
        assert weights_bytes(model.decoder) <= 2_000_000
    if family in ("dycnn", "dynet"):  # the compared sizes are within 2% of hybrid's
        hybrid = Autoencoder(CodecConfig())
        for part in ("encoder", "decoder"):
            ratio = weights_bytes(getattr(model, part)) / weights_bytes(getattr(hybrid, part))
            assert 0.98 <= ratio <= 1.02, part


def test_family_in_the_config_json_and_the_hash():
    assert "family" not in json.loads(CodecConfig().to_json())  # the shipped models' JSON, which their hashes cover
    assert load_codec("native", "cpu").config.family == "hybrid"
    for family in FAMILIES:
        config = CodecConfig(family=family)
        assert CodecConfig.from_json(config.to_json()) == config
    torch.manual_seed(0)
    hybrid = Autoencoder(TINY)
    torch.manual_seed(0)
    conv = Autoencoder(dataclasses.replace(TINY, family="conv"))
    assert hybrid.weights_hash() != conv.weights_hash()


@pytest.mark.parametrize("text", ['{"family": "resnet"}', '{"family": 3}'])
def test_unknown_family_refused(text):
    with pytest.raises(CodecError, match="family"):
        CodecConfig.from_json(text)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_writes_latent_files_that_decode_the_same(family, tmp_path):
    torch.manual_seed(0)
    path = Autoencoder(dataclasses.replace(TINY, family=family)).save_pretrained(tmp_path / f"{family}.safetensors")
    codec = load_codec(str(path), "cpu")
    assert isinstance(codec.fast, FastAutoencoder) == (family == "hybrid")  # the C kernel serves DynamicConv only
    image = smooth_image(37, 51, seed=1)
    latent = codec.encode(image)
    file = latent.save(tmp_path / "a.latent.pt")
    again = load_codec(str(path), "cpu")  # a fresh load decodes the file to the same pixels
    decoded = np.asarray(again.decode(file))
    assert decoded.shape == image.shape
    assert np.array_equal(decoded, np.asarray(codec.decompress(codec.compress(image))))
    if family != "hybrid":  # the other families' codec path is the model's own forward
        pixels = torch.nn.functional.pad(torch.from_numpy(image).permute(2, 0, 1)[None], (0, 5, 0, 3), "replicate")
        with torch.no_grad():
            assert torch.equal(codec.encode_tensor(pixels), codec.model.encoder(pixels))


def test_attention_families_code_whole_images_because_tiles_would_differ():
    image = Image.fromarray(smooth_image(64, 96, seed=2))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    for family, exact in (("conv", True), ("dycnn", False), ("dynet", False)):
        torch.manual_seed(0)
        codec = Codec(Autoencoder(dataclasses.replace(TINY, family=family)), tile=32)
        whole = codec.encode_tensor(pixels)
        tiled = encode_tiled(codec.encode_tensor, image, 32)
        assert torch.equal(tiled, whole) == exact  # a tile's attention pools the tile, not the image
        assert codec.tiles(image) == exact  # so the codec tiles only the families whose tiles are exact
        assert torch.equal(codec.encode(image).codes, Codec(codec.model, tile=None).encode(image).codes)


@pytest.mark.parametrize("family", ["dycnn", "dynet", "conv"])
def test_train_family_from_the_command_line(family, image_folder, tmp_path):
    out = tmp_path / f"{family}.safetensors"
    args = ["train", str(image_folder), "--out", str(out), "--family", family, "--encoder-hidden", "3"]
    args += ["--decoder-hidden", "2", "--steps", "3", "--batch-size", "2", "--crop", "32", "--workers", "0"]
    result = CliRunner().invoke(app, args + ["--device", "cpu", "--temperature-steps", "2"])
    assert result.exit_code == 0, result.output
    model = Autoencoder.from_pretrained(out)
    assert model.config.family == family and isinstance(model.decoder.conv, LAYERS[family])
    info = CliRunner().invoke(app, ["info", str(out)])
    assert LAYERS[family].__name__ in info.output
    bad = CliRunner().invoke(app, args[:4] + ["--family", "resnet", "--force"])
    assert bad.exit_code == 1 and "unknown layer family 'resnet'" in bad.output
