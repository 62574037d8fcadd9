"""Quality and size of a model on a folder of images, through real latent files.

    python benchmarks/evaluate.py ../shared/data/cbsd68 [--model native] [--per-image]

For every image: PSNR (RGB, 8-bit) and MS-SSIM after a round trip through the latent file
bytes that `hybrid-codec encode` writes, the file's bits per pixel (size on disk x 8 / pixels),
and PSNR with float (unquantized) latents, to show what 8-bit quantization costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybrid_codec import Latent, load_codec  # noqa: E402
from hybrid_codec.images import find_images, image_to_tensor, open_image  # noqa: E402
from hybrid_codec.metrics import ms_ssim, psnr  # noqa: E402
from hybrid_codec.runtime import keep_freed_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--per-image", action="store_true", help="Print one line per image.")
    args = parser.parse_args()
    keep_freed_memory()

    codec = load_codec(args.model, device="cpu")
    rows = []
    for path in find_images(args.folder):
        image = open_image(path)
        original = image_to_tensor(image)
        data = codec.encode(image).to_bytes()
        decoded = image_to_tensor(codec.decode(Latent.from_bytes(data)))
        height, width = original.shape[-2:]
        float_decoded = codec.decode_tensor(codec.encode_tensor(original))[..., :height, :width]
        row = {
            "image": path.name,
            "psnr": psnr(original, decoded),
            "psnr_float": psnr(original, float_decoded),
            "ms_ssim": ms_ssim(original, decoded),
            "bpp": len(data) * 8 / (height * width),
        }
        rows.append(row)
        if args.per_image:
            print(
                f"{row['image']:>14}  PSNR {row['psnr']:6.2f} dB (float {row['psnr_float']:6.2f})  "
                f"MS-SSIM {row['ms_ssim']:.4f}  {row['bpp']:.3f} bpp",
                flush=True,
            )
    mean = {k: statistics.fmean(r[k] for r in rows) for k in ("psnr", "psnr_float", "ms_ssim", "bpp")}
    worst = min(rows, key=lambda r: r["psnr"])
    print(
        f"{args.folder} ({len(rows)} images), model {codec.name} ({codec.weights_hash}): "
        f"PSNR {mean['psnr']:.2f} dB (float latents {mean['psnr_float']:.2f} dB), "
        f"MS-SSIM {mean['ms_ssim']:.4f}, {mean['bpp']:.3f} bpp (max {max(r['bpp'] for r in rows):.3f}); "
        f"worst {worst['image']} {worst['psnr']:.2f} dB"
    )


if __name__ == "__main__":
    main()
