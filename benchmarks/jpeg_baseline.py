"""Pillow JPEG on a folder at several qualities: mean PSNR (RGB, 8-bit) and bits per pixel.

    python benchmarks/jpeg_baseline.py ../shared/data/cbsd68 [--qualities 10 15 20 25 30]

The reference point for the codec's own numbers (benchmarks/evaluate.py) on the same images.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybrid_codec.images import find_images, image_to_tensor, open_image  # noqa: E402
from hybrid_codec.metrics import psnr  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--qualities", type=int, nargs="+", default=[10, 15, 20, 25, 30])
    args = parser.parse_args()
    images = [open_image(p) for p in find_images(args.folder)]
    for quality in args.qualities:
        scores, rates = [], []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
            scores.append(psnr(image_to_tensor(image), image_to_tensor(decoded)))
            rates.append(len(buffer.getvalue()) * 8 / (image.width * image.height))
        print(f"JPEG q{quality:<3} PSNR {statistics.fmean(scores):.2f} dB  {statistics.fmean(rates):.3f} bpp")


if __name__ == "__main__":
    main()
