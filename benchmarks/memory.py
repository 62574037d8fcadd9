"""Peak resident memory and time of encoding and decoding huge generated images (16, 64, 256 MP).

    python benchmarks/memory.py [--sizes 16,64,256] [--threads 1] [--untiled 16]

Each size and phase runs in a fresh process, its peak (VmHWM, Linux) reset just before it. The
image is generated in memory (a smooth pattern with texture), as Pillow would hold a decoded
file: 4 bytes per pixel. "encode" is PIL image -> file bytes at the default quality, "decode" is
file bytes -> PIL image. `image MB` is what the image itself takes; `over image MB` is the peak
beyond the codec loaded and the input (encode) or the output (decode) image, the part tiles bound.
`--untiled N` adds the same phases for N megapixels with tiling switched off, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDE_RATIO = 4 / 3  # width / height: a photo's shape


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """The peak resident memory since `reset_peak` (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def reset_peak() -> None:
    """Start the peak afresh (Linux: writing 5 to clear_refs resets VmHWM): generating the image is not measured."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def generated(width: int, height: int):
    """A smooth, textured RGB image built strip by strip (never more than one strip in float)."""
    import numpy as np
    from PIL import Image

    image = Image.new("RGB", (width, height))
    x = np.arange(width, dtype=np.float32)
    rng = np.random.default_rng(0)
    for top in range(0, height, 256):
        y = np.arange(top, min(top + 256, height), dtype=np.float32)[:, None]
        strip = np.stack(
            [128 + 90 * np.sin(x * f + y * g) for f, g in ((0.004, 0.003), (0.002, 0.005), (0.006, 0.001))]
        )
        strip = strip.transpose(1, 2, 0) + rng.normal(0, 6, (len(y), width, 1)).astype(np.float32)
        image.paste(Image.fromarray(np.clip(strip, 0, 255).astype(np.uint8), "RGB"), (0, top))
    return image


def phase(kind: str, megapixels: float, tiled: bool, data_path: Path) -> dict:
    import torch

    from hybrid_codec import load_codec

    height = int((megapixels * 1e6 / SIDE_RATIO) ** 0.5)
    width = int(height * SIDE_RATIO)
    codec = load_codec("photo", "cpu", max_pixels=width * height)
    if not tiled:
        codec.tile = None
    codec.decompress(codec.compress(generated(64, 48)))  # warm: one-time set-up is not the image's
    with torch.inference_mode():
        if kind == "encode":
            image = generated(width, height)
            reset_peak()
            base = rss_mb()
            begin = time.perf_counter()
            data_path.write_bytes(codec.compress(image))
        else:
            data = data_path.read_bytes()
            reset_peak()
            base = rss_mb() + width * height * 4 / 2**20  # the output image, as Pillow holds it
            begin = time.perf_counter()
            image = codec.decompress(data)
        seconds = time.perf_counter() - begin
    return {
        "phase": kind,
        "megapixels": round(width * height / 1e6, 1),
        "size": f"{width}x{height}",
        "tiled": tiled,
        "seconds": round(seconds, 1),
        "peak_mb": round(peak_mb()),
        "image_mb": round(width * height * 4 / 2**20),
        "over_image_mb": round(peak_mb() - base),
        "file_bytes": data_path.stat().st_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256", help="megapixels, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--untiled", default="16", help="sizes to run untiled too ('' for none)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # kind,megapixels,tiled,path: one child process
    args = parser.parse_args()
    if args.phase:
        import torch

        torch.set_num_threads(args.threads)
        kind, megapixels, tiled, path = args.phase.split(",")
        print(json.dumps(phase(kind, float(megapixels), tiled == "1", Path(path))))
        return
    runs = [(float(s), True) for s in args.sizes.split(",") if s]
    runs += [(float(s), False) for s in args.untiled.split(",") if s]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    header = ("MP", "size", "tiled", "phase", "s", "peak MB", "image MB", "over image MB")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 12, 6, 7, 7, 8, 9, 14), strict=True)))
    with tempfile.TemporaryDirectory() as folder:
        for megapixels, tiled in runs:
            path = Path(folder) / "image.hyb"
            for kind in ("encode", "decode"):
                command = [sys.executable, __file__, "--threads", str(args.threads)]
                command += ["--phase", f"{kind},{megapixels},{int(tiled)},{path}"]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    print(f"{megapixels:>6} {kind} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                    break
                r = json.loads(done.stdout)
                print(
                    f"{r['megapixels']:>6} {r['size']:>12} {'yes' if tiled else 'no':>6} {kind:>7} {r['seconds']:>7} "
                    f"{r['peak_mb']:>8} {r['image_mb']:>9} {r['over_image_mb']:>14}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
