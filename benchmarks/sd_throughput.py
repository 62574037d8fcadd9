"""SD latents per second on a CUDA GPU: the `sd` model's encoder on batches of 512x512 images.

    python benchmarks/sd_throughput.py [--batch-sizes 8,32,128] [--seconds 3] [--device cuda:0]

Each batch of random 512x512 images goes through the encoder (PyTorch path: the compiled CPU
kernel serves CPUs only) in float32, bfloat16 and float16, each in the default and the
channels-last layout; the figure is images per second over `--seconds` of repeated calls after
warm-up, timed with CUDA events. Where no GPU is present it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from hybrid_codec.zoo import resolve_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def images_per_second(encoder, batch: torch.Tensor, seconds: float) -> float:
    with torch.inference_mode():
        for _ in range(3):
            encoder(batch)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        calls, begin = 0, time.perf_counter()
        start.record()
        while time.perf_counter() - begin < seconds:
            encoder(batch)
            calls += 1
        end.record()
        torch.cuda.synchronize()
    return calls * batch.shape[0] / (start.elapsed_time(end) / 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="8,32,128")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="sd", help="an SD-space model: sd, or a weights file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this benchmark measures GPU throughput only, and did not run")
        return 0
    from hybrid_codec.models import Autoencoder

    device = torch.device(args.device)
    model = Autoencoder.from_pretrained(resolve_weights(args.model), device=device).eval()
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, model {model.config.name}, 512x512")
    print(f"{'batch':>6} {'dtype':>9} {'layout':>14} {'images/s':>10}")
    for size in (int(s) for s in args.batch_sizes.split(",")):
        for name, dtype in DTYPES.items():
            encoder = model.encoder.to(dtype)
            for layout in (torch.contiguous_format, torch.channels_last):
                batch = torch.rand(size, 3, 512, 512, device=device, dtype=dtype).contiguous(memory_format=layout)
                try:
                    rate = f"{images_per_second(encoder, batch, args.seconds):.0f}"
                except torch.OutOfMemoryError:
                    rate = "out of memory"
                    torch.cuda.empty_cache()
                label = "channels-last" if layout is torch.channels_last else "contiguous"
                print(f"{size:>6} {name:>9} {label:>14} {rate:>10}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
