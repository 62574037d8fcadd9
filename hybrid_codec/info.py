"""`hybrid-codec info`: what a latent file or a weights file holds."""

from __future__ import annotations

from pathlib import Path

from .bitstream import Latent
from .errors import CodecError
from .evaluation import bits_per_pixel


def describe(path: Path) -> dict[str, object]:
    """What a latent file or a weights file holds, as label -> value."""
    if not path.is_file():
        raise CodecError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from .models import Autoencoder, weights_bytes

        model = Autoencoder.from_pretrained(path)
        c = model.config
        return {
            "kind": "hybrid-codec weights",
            "model": c.name,
            "latent space": c.latent_space,
            "weights hash": model.weights_hash(),
            "encoder": f"DynamicConv(3, {c.latent_channels}, kernel {c.downscale}, stride {c.downscale}, "
            f"hidden {c.encoder_hidden}): {weights_bytes(model.encoder) / 1000:.1f} KB",
            "decoder": f"DynamicConv({c.latent_channels}, {3 * c.downscale**2}, kernel {c.decoder_kernel}, "
            f"hidden {c.decoder_hidden}) + PixelShuffle({c.downscale}): {weights_bytes(model.decoder) / 1000:.1f} KB",
            "config": c.to_json(),
        }
    latent = Latent.load(path)
    size = path.stat().st_size
    return {
        "kind": "hybrid-codec latent (format 1)",
        "model": latent.model,
        "weights hash": latent.weights,
        "latent space": latent.latent_space,
        "image size": f"{latent.width}x{latent.height}",
        "latent shape": "x".join(str(n) for n in latent.codes.shape),
        "file size": f"{size:,} bytes",
        "bits per pixel": f"{bits_per_pixel(size, latent.height, latent.width):.3f}",
    }


def human_bytes(n: int) -> str:
    return f"{n / 1000:.1f} KB" if n >= 1000 else f"{n} B"
