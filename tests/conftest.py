"""Shared fixtures. Tests never touch the network: the Hub is forced offline here."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hybrid_codec.models import Autoencoder, CodecConfig  # noqa: E402

TINY = CodecConfig(name="tiny", encoder_hidden=4, decoder_hidden=4)


@pytest.fixture
def tiny_weights(tmp_path):
    """A small randomly initialised model saved as a weights file."""
    torch.manual_seed(0)
    return Autoencoder(TINY).save_pretrained(tmp_path / "tiny.safetensors")


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A synthetic photo-like uint8 image: smooth gradients, blobs and a little texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fy, fx, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        image[..., c] = 0.5 + 0.35 * np.sin(fy * y + fx * x + phase)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(4, max(5, min(height, width) / 3))
        image += (((y - cy) ** 2 + (x - cx) ** 2) < r * r)[..., None] * rng.uniform(-0.3, 0.3, 3)
    image += rng.normal(0, 0.02, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    """A folder of a few generated PNG images for training tests."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(smooth_image(96 + 16 * i, 128, seed=i)).save(folder / f"img{i}.png")
    return folder
