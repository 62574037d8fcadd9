"""The `sd` model's numbers: latent error against the SD-space targets, and its own round trip.

    python benchmarks/sd_eval.py [--model sd] [--tiles ../shared/teacher/photos]
        [--photos ../shared/data/photos] [--val 045,046,047,048,049] [--cbsd68 ../shared/data/cbsd68]

1. Latent relative error on the validation tiles (photos 045-049, held out of `distill`): for each
   channel, the MSE between the encoder's latents and the targets divided by the targets' variance
   over all validation tiles; then the mean over the 4 channels (0 = exact, 1 = no better than
   predicting each channel's mean). Encoded at the tiles' own 512x512 geometry.
2. The model's own round trip (its DynamicConv decoder, through real 8-bit latent file bytes) on
   every image of cbsd68: mean PSNR over RGB 8-bit and mean bits per pixel of the latent files.

The targets are the original author's SD-space encoder's outputs (see ../shared/teacher/README.md),
not the real SD VAE's: error 1. measures distance to those targets only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybrid_codec import Latent, load_codec  # noqa: E402
from hybrid_codec.distill import TileCrops, find_tiles  # noqa: E402
from hybrid_codec.images import find_images, image_to_tensor, open_image  # noqa: E402
from hybrid_codec.metrics import psnr  # noqa: E402
from hybrid_codec.runtime import keep_freed_memory  # noqa: E402

SHARED = ROOT.parent / "shared"


@torch.inference_mode()
def latent_errors(codec, tiles_dir: Path, photos: Path, names: list[str]) -> tuple[list[float], int]:
    """Per-channel MSE / target variance over every validation tile, and the number of tiles."""
    images = [p for p in find_images(photos) if p.stem in names]
    tiles = find_tiles(tiles_dir, images, warn=lambda m: None)
    pairs = TileCrops(tiles, 8, seed=0).whole()
    channels = codec.config.latent_channels
    sq_err, total, total_sq, count = (torch.zeros(channels, dtype=torch.float64) for _ in range(4))
    for image, target in pairs:
        latent = codec.encode_tensor(image[None])[0].double().cpu()
        target = target.double()
        sq_err += (latent - target).pow(2).sum((1, 2))
        total += target.sum((1, 2))
        total_sq += target.pow(2).sum((1, 2))
        count += target[0].numel()
    variance = total_sq / count - (total / count) ** 2
    return (sq_err / count / variance).tolist(), len(pairs)


def roundtrip(codec, folder: Path) -> tuple[float, float, int]:
    """Mean PSNR and bits per pixel of real latent files over every image in `folder`."""
    scores, rates = [], []
    for path in find_images(folder):
        image = open_image(path)
        data = codec.encode(image).to_bytes()
        decoded = codec.decode(Latent.from_bytes(data))
        scores.append(psnr(image_to_tensor(image), image_to_tensor(decoded)))
        rates.append(len(data) * 8 / (image.width * image.height))
    return statistics.mean(scores), statistics.mean(rates), len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd")
    parser.add_argument("--tiles", type=Path, default=SHARED / "teacher" / "photos")
    parser.add_argument("--photos", type=Path, default=SHARED / "data" / "photos")
    parser.add_argument("--val", default="045,046,047,048,049", help="Comma-separated validation photo names.")
    parser.add_argument("--cbsd68", type=Path, default=SHARED / "data" / "cbsd68")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)

    codec = load_codec(args.model, device=args.device)
    print(f"model {codec.name!r} ({codec.config.latent_space} latent space, weights {codec.weights_hash})")
    per_channel, tiles = latent_errors(codec, args.tiles, args.photos, args.val.split(","))
    channels = ", ".join(f"{e:.4f}" for e in per_channel)
    print(
        f"latent relative error on {tiles} validation tiles: {statistics.mean(per_channel):.4f} "
        f"(per channel {channels})"
    )
    mean_psnr, mean_bpp, count = roundtrip(codec, args.cbsd68)
    print(f"own round trip on {count} cbsd68 images: PSNR {mean_psnr:.2f} dB, {mean_bpp:.3f} bpp")


if __name__ == "__main__":
    main()
