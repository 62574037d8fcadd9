"""The shipped weights and samples: budgets, quality, and that the samples were made by these weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybrid_codec import Latent, load_codec
from hybrid_codec.evaluation import roundtrip
from hybrid_codec.models import Autoencoder, weights_bytes
from hybrid_codec.zoo import SHIPPED, weights_dir

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_weights_fit_the_size_budgets(name):
    model = Autoencoder.from_pretrained(weights_dir() / SHIPPED[name])
    assert model.config.name == name
    assert model.config.latent_space == ("sd" if name == "sd" else "native")
    assert weights_bytes(model.encoder) <= 100_000
    assert weights_bytes(model.decoder) <= 2_000_000


def test_default_codec_restores_the_sample_photo_within_budget():
    result = roundtrip(load_codec(device="cpu"), SAMPLES / "astronaut.png")
    assert result.decoded.size == result.original.size == (512, 512)
    assert result.bpp <= 0.5
    assert result.psnr >= 24.5  # measured 25.67 dB (MS-SSIM 0.957, 0.418 bpp) for the shipped weights
    assert result.ms_ssim >= 0.9


def test_sample_latent_was_made_by_the_shipped_weights_and_decodes_to_the_sample_png():
    latent = Latent.load(SAMPLES / "astronaut.latent.pt")
    codec = load_codec(latent.model, device="cpu")
    assert latent.weights == codec.weights_hash
    decoded = np.asarray(codec.decode(latent), dtype=np.int16)
    shipped = np.asarray(Image.open(SAMPLES / "astronaut.decoded.png").convert("RGB"), dtype=np.int16)
    # the same computation; only the order of float sums may differ with the thread count
    assert decoded.shape == shipped.shape
    assert np.abs(decoded - shipped).max() <= 1


def test_sd_model_makes_sd_space_latents():
    codec = load_codec("sd", device="cpu")
    latent = codec.encode(SAMPLES / "astronaut.png")
    assert latent.latent_space == "sd" and latent.model == "sd"
    # raw SD VAE latents of photos sit around channel means (4.8, 2.8, 0.2, -2.5), spread 2-4
    means = latent.dequantize().mean(dim=(0, 2, 3))
    assert means.abs().max() < 12
