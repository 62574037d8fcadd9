"""The shipped weights, by name."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CodecError

DEFAULT_MODEL = "photo"
SHIPPED = {
    "photo": "photo.safetensors",  # the default codec: `native` fine-tuned with a rate term, with quality levels
    "native": "native.safetensors",  # the first codec, 8-bit min/max latents only: it reads the files it wrote
    "sd": "sd.safetensors",  # encoder into the Stable Diffusion VAE latent space, and its decoder
}


def weights_dir() -> Path:
    """`hybrid_codec/weights` in an installed wheel, `weights/` beside the package in a checkout."""
    packaged = Path(__file__).parent / "weights"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "weights"


def resolve_weights(name_or_path: str | os.PathLike | None) -> Path:
    """A shipped model's name, or a path to a weights file -> the weights file."""
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    if name in SHIPPED:
        path = weights_dir() / SHIPPED[name]
        if not path.is_file():
            raise CodecError(f"shipped weights {name!r} are missing ({path}); reinstall hybrid-codec")
        return path
    path = Path(name)
    if not path.is_file():
        raise CodecError(f"{name}: neither a shipped model ({', '.join(SHIPPED)}) nor a weights file")
    return path
