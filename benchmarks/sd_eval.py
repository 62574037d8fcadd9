"""The `sd` model's numbers: latent error against the SD-space targets, and its own round trip.

    python benchmarks/sd_eval.py [--model sd] [--tiles ../shared/teacher/photos ../shared/teacher/photos-s065]
        [--photos ../shared/data/photos] [--val 045,046,047,048,049] [--cbsd68 ../shared/data/cbsd68]

1. Latent relative error on the validation tiles (photos 045-049, held out of `distill`) of each
   tile folder (`photos-s065/`: the photos at 0.65 scale), tile by tile as the teacher README
   defines it: per tile and channel, the MSE between the encoder's latents and the targets over
   the targets' variance within that tile and channel; the mean over tiles per channel, and the
   mean of the 4 channels (0 = exact, 1 = no better than each tile's mean). Encoded at the
   tiles' own 512x512 geometry, through the codec's inference path.
2. The model's own round trip (its DynamicConv decoder, through real latent file bytes) on every
   image of cbsd68, at each quality level (or in 8-bit files for weights without levels): mean
   PSNR over RGB 8-bit and mean bits per pixel of the latent files.

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

from hybrid_codec import load_codec  # noqa: E402
from hybrid_codec.distill import TileCrops, find_tiles, relative_errors  # noqa: E402
from hybrid_codec.images import find_images, image_to_tensor, open_image  # noqa: E402
from hybrid_codec.metrics import psnr  # noqa: E402
from hybrid_codec.runtime import keep_freed_memory  # noqa: E402

SHARED = ROOT.parent / "shared"


@torch.inference_mode()
def latent_errors(codec, tiles_dir: Path, photos: Path, names: list[str]) -> tuple[list[float], int]:
    """Per channel, the mean over the validation tiles of MSE / the tile's own target variance; tiles."""
    images = [p for p in find_images(photos) if p.stem in names]
    pairs = TileCrops(find_tiles(tiles_dir, images, warn=lambda m: None), 8, seed=0).whole()
    errors = [
        relative_errors(codec.encode_tensor(image[None]).double().cpu(), target[None].double())
        for image, target in pairs
    ]
    return torch.cat(errors).mean(0).tolist(), len(pairs)


def roundtrip(codec, folder: Path, quality: int | None = None) -> tuple[float, float, int]:
    """Mean PSNR and bits per pixel of real latent files (at `quality`; None: the default) of each image in `folder`."""
    scores, rates = [], []
    for path in find_images(folder):
        image = open_image(path)
        data = codec.compress(image, quality)
        decoded = codec.decompress(data)
        scores.append(psnr(image_to_tensor(image), image_to_tensor(decoded)))
        rates.append(len(data) * 8 / (image.width * image.height))
    return statistics.mean(scores), statistics.mean(rates), len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd")
    teacher = SHARED / "teacher"
    parser.add_argument(
        "--tiles", type=Path, nargs="+", default=[teacher / "photos", teacher / "photos-s065"], help="Tile folders."
    )
    parser.add_argument("--photos", type=Path, default=SHARED / "data" / "photos")
    parser.add_argument("--val", default="045,046,047,048,049", help="Comma-separated validation photo names.")
    parser.add_argument("--cbsd68", type=Path, default=SHARED / "data" / "cbsd68")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)

    codec = load_codec(args.model, device=args.device)
    print(f"model {codec.name!r} ({codec.config.latent_space} latent space, weights {codec.weights_hash})")
    for folder in args.tiles:
        per_channel, tiles = latent_errors(codec, folder, args.photos, args.val.split(","))
        channels = ", ".join(f"{e:.4f}" for e in per_channel)
        print(
            f"latent relative error on {tiles} validation tiles of {folder.name}/: "
            f"{statistics.mean(per_channel):.4f} (per channel {channels})"
        )
    for quality in range(1, codec.quality_levels + 1) or [None]:
        mean_psnr, mean_bpp, count = roundtrip(codec, args.cbsd68, quality)
        which = f"level {quality}" + (" (default)" if quality == codec.check_quality(None) else "") if quality else ""
        print(f"own round trip on {count} cbsd68 images {which}: PSNR {mean_psnr:.2f} dB, {mean_bpp:.3f} bpp")


if __name__ == "__main__":
    main()
