"""The layer families compared (docs/layers.md): BD-rate against hybrid, PSNR at fixed rates, times, sizes.

    hybrid-codec eval ../shared/data/cbsd68 --model RUNS/FAMILY.safetensors --classic "" --json RUNS/FAMILY.json
    python benchmarks/families.py RUNS [--families hybrid,dycnn,dynet,conv] [--rates 0.1,0.125,0.15]

RUNS holds, per family, the weights FAMILY.safetensors, the training checkpoint FAMILY.ckpt
(steps and seconds trained) and the eval JSON FAMILY.json. Prints one markdown row per family:
mean PSNR interpolated at each rate (n/a outside its levels' range), BD-rate and BD-PSNR against
the first family, median encode and decode ms of the files (`eval`'s, over images and levels),
encoder and decoder float32 KB, steps and minutes trained.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybrid_codec import rd  # noqa: E402
from hybrid_codec.models import Autoencoder, weights_bytes  # noqa: E402


def psnr_at(rows: list[rd.Mean], bpp: float) -> float:
    """PSNR of the model's curve at `bpp`, linearly between its levels; NaN outside them."""
    xs, ys = [r.bpp for r in rows], [r.psnr for r in rows]
    return float(np.interp(bpp, xs, ys)) if xs[0] <= bpp <= xs[-1] else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--families", default="hybrid,dycnn,dynet,conv")
    parser.add_argument("--rates", default="0.1,0.125,0.15")
    args = parser.parse_args()
    families = args.families.split(",")
    rates = [float(r) for r in args.rates.split(",")]
    rows, names = {}, {}
    for family in families:
        body = json.loads((args.runs / f"{family}.json").read_text())
        means = [rd.Mean(**m) for m in body["means"]]
        names[family] = means[0].codec
        rows[family] = rd.curve(means, means[0].codec)
    anchor = families[0]
    header = [f"PSNR at {r:g} bpp" for r in rates] + [f"BD-rate vs {anchor}", f"BD-PSNR vs {anchor}"]
    header += ["encode ms", "decode ms", "encoder KB", "decoder KB", "steps", "minutes trained"]
    print("| family | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for family in families:
        both = [*rows[anchor], *rows[family]] if family != anchor else rows[anchor]
        delta = next((d for d in rd.deltas(both, names[family]) if d.anchor == names[anchor]), None)
        model = Autoencoder.from_pretrained(args.runs / f"{family}.safetensors")
        state = torch.load(args.runs / f"{family}.ckpt", map_location="cpu", weights_only=True)
        ms = [float(np.median([getattr(r, f"{kind}_ms") for r in rows[family]])) for kind in ("encode", "decode")]
        cells = [f"{v:.2f}" if math.isfinite(v := psnr_at(rows[family], r)) else "n/a" for r in rates]
        if delta is None:
            cells += ["0 (anchor)", "0 (anchor)"]
        else:  # BD-rate needs a common PSNR range, BD-PSNR a common rate range
            rate = f"{delta.bd_rate:+.1f}%" if math.isfinite(delta.bd_rate) else "n/a (no common PSNR)"
            cells += [rate, f"{delta.bd_psnr:+.2f} dB" if math.isfinite(delta.bd_psnr) else "n/a"]
        cells += [f"{v:.1f}" for v in ms]
        cells += [f"{weights_bytes(model.encoder) / 1000:.1f}", f"{weights_bytes(model.decoder) / 1000:.1f}"]
        cells += [str(state["step"]), f"{state['seconds'] / 60:.1f}"]
        print(f"| {family} | " + " | ".join(cells) + " |")
    print()
    for family in families:
        levels = ", ".join(f"{r.bpp:.3f} / {r.psnr:.2f}" for r in rows[family])
        print(f"{family}: levels bpp / PSNR dB: {levels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
