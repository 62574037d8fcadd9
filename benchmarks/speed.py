"""Encode/decode speed of the codec vs. the per-channel loop reference and Pillow JPEG, in one run.

    python benchmarks/speed.py [--image samples/astronaut.png] [--model native] [--repeats 7] [--profile]

The image is resized to 768x512. "encode" is PIL image -> latent file bytes; "decode" is latent
file bytes -> PIL image: both include quantization, compression and the container, as JPEG's
times include its entropy coding. The loop reference runs the same weights through
`tests/loop_reference.py` (one Python loop iteration per output channel). `--profile` also prints
where one decode spends its time, per PyTorch operator.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybrid_codec import Latent, load_codec  # noqa: E402
from hybrid_codec.layers import DynamicConv  # noqa: E402
from hybrid_codec.runtime import keep_freed_memory  # noqa: E402
from tests.loop_reference import loop_dynamic_conv, predictors  # noqa: E402


def median_ms(job, repeats: int) -> float:
    job()  # warm-up
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        job()
        times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


def codec_times(codec, image: Image.Image, repeats: int) -> tuple[float, float]:
    data = codec.encode(image).to_bytes()
    encode = median_ms(lambda: codec.encode(image).to_bytes(), repeats)
    decode = median_ms(lambda: codec.decode(Latent.from_bytes(data)), repeats)
    return encode, decode


def print_decode_profile(codec, image: Image.Image) -> None:
    """The operators one decode spends its time in: the speed work starts from this table."""
    from torch.profiler import ProfilerActivity, profile

    data = codec.encode(image).to_bytes()
    codec.decode(Latent.from_bytes(data))  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        codec.decode(Latent.from_bytes(data))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def use_loop_reference(codec) -> None:
    """Swap every DynamicConv's forward for the per-channel loop, same weights."""
    for layer in codec.model.modules():
        if isinstance(layer, DynamicConv):
            layer.forward = partial(loop_dynamic_conv, layer, mlps=predictors(layer))


def jpeg_times(image: Image.Image, quality: int, repeats: int) -> tuple[float, float, int]:
    def encode() -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()

    data = encode()
    return median_ms(encode, repeats), median_ms(lambda: Image.open(io.BytesIO(data)).load(), repeats), len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(ROOT / "samples" / "astronaut.png"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="also print the operators of one decode")
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does

    image = Image.open(args.image).convert("RGB").resize((768, 512), Image.BICUBIC)
    codec = load_codec(args.model, device="cpu")
    print(f"image 768x512, torch {torch.__version__}, {torch.get_num_threads()} threads, model {codec.name}")
    enc, dec = codec_times(codec, image, args.repeats)
    if args.profile:
        print_decode_profile(codec, image)
    jpeg_enc, jpeg_dec, jpeg_bytes = jpeg_times(image, 20, args.repeats)
    use_loop_reference(codec)
    loop_enc, loop_dec = codec_times(codec, image, max(1, args.repeats // 3))

    rows = [
        ("hybrid-codec (vectorized)", enc, dec),
        ("loop reference", loop_enc, loop_dec),
        (f"Pillow JPEG q20 ({jpeg_bytes * 8 / (768 * 512):.2f} bpp)", jpeg_enc, jpeg_dec),
    ]
    print(f"{'':34} {'encode ms':>10} {'decode ms':>10}")
    for name, e, d in rows:
        print(f"{name:34} {e:10.1f} {d:10.1f}")
    print(f"decode speed-up over the loop reference: {loop_dec / dec:.1f}x (target >= 7x)")
    print(f"encode time / JPEG encode time: {enc / jpeg_enc:.2f}x (target <= 3x)")


if __name__ == "__main__":
    main()
