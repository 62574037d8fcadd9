"""How much an encoder-side search could add: refine each latent against the fixed decoder.

    python benchmarks/latent_refinement.py ../shared/data/cbsd68 [--model native] [--steps 20] [--every 8]

For every `--every`-th image: start from the encoder's latent, take `--steps` Adam steps on the
latent itself to lower the decoder's MSE (8-bit quantization in the loop, straight-through), then
compare PSNR and latent file size with the plain encoding. The files stay decodable by the same
weights: only the encoder's answer changes. An experiment for the roadmap's quality levels, not
part of the codec.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybrid_codec import Latent, load_codec  # noqa: E402
from hybrid_codec.images import find_images, image_to_tensor, open_image  # noqa: E402
from hybrid_codec.metrics import psnr  # noqa: E402
from hybrid_codec.quantize import dequantize, fake_quantize, quantize  # noqa: E402


def refine(codec, image: torch.Tensor, latent: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    height, width = image.shape[-2:]
    latent = latent.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([latent], lr=lr)
    for _ in range(steps):
        decoded = codec.model.decoder(fake_quantize(latent))[..., :height, :width]
        loss = F.mse_loss(decoded, image)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return latent.detach()


def score(codec, image: torch.Tensor, latent: torch.Tensor) -> tuple[float, float]:
    """PSNR and bits per pixel of the latent file this latent gives."""
    height, width = image.shape[-2:]
    codes, low, step = quantize(latent)
    decoded = codec.decode_tensor(dequantize(codes, low, step))[..., :height, :width]
    file = Latent(codes[0], low[0], step[0], height, width, codec.name, codec.weights_hash)
    return psnr(image, decoded), len(file.to_bytes()) * 8 / (height * width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--every", type=int, default=8, help="use every N-th image (1: all)")
    args = parser.parse_args()

    codec = load_codec(args.model, device="cpu")
    codec.model.requires_grad_(False)
    rows = []
    for path in find_images(args.folder)[:: args.every]:
        image = image_to_tensor(open_image(path))
        plain = codec.encode_tensor(image)
        began = time.perf_counter()
        refined = refine(codec, image, plain, args.steps, args.lr)
        seconds = time.perf_counter() - began
        (p0, r0), (p1, r1) = score(codec, image, plain), score(codec, image, refined)
        rows.append((p0, p1, r0, r1, seconds))
        print(f"{path.name:14} {p0:6.2f} -> {p1:6.2f} dB   {r0:.3f} -> {r1:.3f} bpp   {seconds:5.1f} s")
    n = len(rows)
    p0, p1, r0, r1, seconds = (sum(column) / n for column in zip(*rows, strict=True))
    print(
        f"mean of {n} images, {args.steps} steps: {p0:.2f} -> {p1:.2f} dB, {r0:.3f} -> {r1:.3f} bpp, "
        f"{seconds:.1f} s per image ({torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
