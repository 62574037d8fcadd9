"""Encode/decode speed of the codec vs. the per-channel loop reference and Pillow JPEG, in one run.

    python benchmarks/speed.py [--image samples/astronaut.png] [--model photo] [--rounds 9] [--profile] [--onnx-only]

The image is resized to 768x512. "encode" is image -> latent file bytes and "decode" is latent
file bytes -> PIL image: both include quantization, compression and the container, as JPEG's
times include its entropy coding. The codec encodes the image's HxWx3 uint8 array (its native
input, as a PIL image is Pillow's); "from a PIL image" adds Pillow's export of the pixels
(`np.asarray(image)`, about 1.3 ms here, paid inside Pillow by its JPEG encoder too).

Rows: the model (default `photo`) at its highest quality level, through the compact file with its
entropy coding, with the compiled kernel where one serves (`hybrid_codec/fast.py`: the variant is
printed in the first line; `HYBRID_CODEC_KERNEL=avx2` or `portable` takes a lower one); the 8-bit
`.pt` files of before quality levels (the `native` weights, the same architecture: the baseline
the levels must stay within 10% of); the level with PyTorch only (HYBRID_CODEC_KERNEL=0); the loop
reference (the `native` weights through `tests/loop_reference.py`, one Python loop iteration per
output channel) and Pillow JPEG at quality 20; last, the level's entropy coding alone (codes <->
payload: `entropy.EntropyCoder`). The contenders run in interleaved rounds; in each, every job
runs once to warm up and then once (or, under 20 ms, five times, keeping the median), and each
figure is the median over the rounds: this machine's speed drifts by up to a third within minutes,
and interleaving keeps that drift out of the ratios. `--profile` also prints where one decode
spends its time, per PyTorch operator (the kernel shows as its caller).

A second table times the model alone (a float (1, 3, 512, 768) tensor -> latent -> image, no
quantization or file) in onnxruntime on the CPU, the graphs of `hybrid-codec export`, at each graph
optimisation level (ORT_DISABLE_ALL, BASIC, EXTENDED, ALL) with intra-op threads set to torch's
thread count, next to PyTorch's plain layers (`layers.py`, what was exported) and the codec's CPU
plan with and without the compiled kernel; in interleaved rounds, medians, with the CPU's vector
flags. It needs the `[onnx]` extra and says so where it is missing; `--onnx-only` prints only it.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybrid_codec import Latent, fast, load_codec  # noqa: E402
from hybrid_codec.runtime import keep_freed_memory  # noqa: E402
from tests.loop_reference import loop_dynamic_conv, predictors  # noqa: E402


def timed(job) -> float:
    begin = time.perf_counter()
    job()
    return (time.perf_counter() - begin) * 1000


def pytorch_only(job):
    """The job with the compiled kernel switched off."""

    def run():
        setting = os.environ.get("HYBRID_CODEC_KERNEL")
        os.environ["HYBRID_CODEC_KERNEL"] = "0"
        try:
            return job()
        finally:  # the caller's setting (a variant it asked for) back
            if setting is None:
                del os.environ["HYBRID_CODEC_KERNEL"]
            else:
                os.environ["HYBRID_CODEC_KERNEL"] = setting

    return run


def print_decode_profile(codec, data: bytes) -> None:
    """The operators one decode spends its time in: the speed work starts from this table."""
    from torch.profiler import ProfilerActivity, profile

    codec.decode(Latent.from_bytes(data))  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        codec.decode(Latent.from_bytes(data))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def loop_reference(codec):
    """The same codec with both fast layers swapped for the per-channel loop (it takes float input only)."""
    codec = load_codec(codec.name, device="cpu")
    for part in ("encoder", "decoder"):
        layer = getattr(codec.model, part).conv
        setattr(codec.fast, part, partial(loop_dynamic_conv, layer, mlps=predictors(layer)))
    return codec


def cpu_flags() -> str:
    """The CPU's vector instruction sets, as /proc/cpuinfo lists them (Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith(("flags", "Features"))), [])
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    vector = sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx", "sse4", "asimd", "sve")))
    return f"{model}: {' '.join(vector) or 'no vector flags listed'}"


def median_times(contenders: dict, rounds: int) -> dict[str, list[float]]:
    """Each contender's (encode, decode) jobs in interleaved rounds: the median ms of each."""
    times = {name: ([], []) for name in contenders}
    for _ in range(rounds):
        for name, jobs in contenders.items():
            for job, column in zip(jobs, times[name], strict=True):
                if job is not None:  # warm first: the previous contender (the loop reference) left the caches cold
                    repeats = 5 if timed(job) < 20 else 1  # a short job is at the mercy of one hiccup
                    column.append(statistics.median(timed(job) for _ in range(repeats)))
    return {name: [statistics.median(c) if c else float("nan") for c in cols] for name, cols in times.items()}


def onnx_table(model: str | None, rounds: int) -> None:
    """The model alone in onnxruntime at each optimisation level, next to PyTorch's plain layers and plan."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"onnxruntime table skipped: {', '.join(missing)} not installed (pip install -e '.[onnx]')")
        return
    import onnxruntime as ort

    from hybrid_codec import onnx_export

    codec = load_codec(model, device="cpu")
    threads = torch.get_num_threads()
    image = torch.rand(1, 3, 512, 768, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        latent = codec.model.encoder(image)
    levels = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
    with tempfile.TemporaryDirectory() as folder:
        onnx_export.export(model or "photo", folder)
        sessions = {}
        for level in levels:
            options = ort.SessionOptions()
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            sessions[level] = [
                ort.InferenceSession(str(Path(folder) / name), options, providers=["CPUExecutionProvider"])
                for name in (onnx_export.ENCODER, onnx_export.DECODER)
            ]

    def planned(job):
        def run():
            with torch.inference_mode():
                return job()

        return run

    contenders = {
        "PyTorch, plain layers (what is exported)": (
            planned(lambda: codec.model.encoder(image)),
            planned(lambda: codec.model.decoder(latent)),
        ),
        "PyTorch, the codec's plan, compiled kernel": (
            planned(lambda: codec.fast.encode(image)),
            planned(lambda: codec.fast.decode(latent)),
        ),
        "PyTorch, the codec's plan, no kernel": (
            pytorch_only(planned(lambda: codec.fast.encode(image))),
            pytorch_only(planned(lambda: codec.fast.decode(latent))),
        ),
    }
    for level, (encoder, decoder) in sessions.items():
        contenders[f"onnxruntime {ort.__version__}, {level}"] = (
            partial(encoder.run, None, {"image": image.numpy()}),
            partial(decoder.run, None, {"latent": latent.numpy()}),
        )
    median = median_times(contenders, rounds)
    print(
        f"the model alone, float (1, 3, 512, 768), {threads} threads (torch and onnxruntime's intra-op), "
        f"model {codec.name}, ONNX opset {onnx_export.OPSET}, median of {rounds} interleaved rounds"
    )
    print(f"CPU {cpu_flags()}; kernel variant {fast.kernel_description()}")
    print(f"{'':48} {'encode ms':>10} {'decode ms':>10}")
    for name, (enc, dec) in median.items():
        print(f"{name:48} {enc:10.1f} {dec:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(ROOT / "samples" / "astronaut.png"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile", action="store_true", help="also print the operators of one decode")
    parser.add_argument("--onnx-only", action="store_true", help="only the table of the model in onnxruntime")
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does
    if args.onnx_only:
        onnx_table(args.model, args.rounds)
        return

    image = Image.open(args.image).convert("RGB").resize((768, 512), Image.BICUBIC)
    pixels = np.asarray(image).copy()
    codec = load_codec(args.model, device="cpu")  # the default `photo`: quality levels, compact files
    top = codec.quality_levels or None
    legacy = load_codec("native", device="cpu")  # the 8-bit .pt files of before quality levels, same architecture
    reference = loop_reference(legacy)
    data = codec.compress(pixels, top)
    legacy_data = legacy.encode(pixels).to_bytes()
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=20)
    jpeg_data = jpeg.getvalue()

    def jpeg_encode() -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=20)
        return buffer.getvalue()

    bpp = 8 / (768 * 512)
    level = f"level {top}" if top else "8-bit"
    contenders = {  # name: (encode, decode)
        f"{codec.name} {level} ({len(data) * bpp:.2f} bpp)": (
            lambda: codec.compress(pixels, top),
            lambda: codec.decompress(data),
        ),
        f"native 8-bit .pt ({len(legacy_data) * bpp:.2f} bpp)": (
            lambda: legacy.encode(pixels).to_bytes(),
            lambda: legacy.decode(Latent.from_bytes(legacy_data)),
        ),
        f"{codec.name} {level}, PyTorch only": (
            pytorch_only(lambda: codec.compress(pixels, top)),
            pytorch_only(lambda: codec.decompress(data)),
        ),
        f"{codec.name} {level}, from a PIL image": (lambda: codec.compress(image, top), None),
        "loop reference": (  # float input: the loop knows nothing of 8-bit images
            lambda: reference.encode(torch.from_numpy(pixels).permute(2, 0, 1) / 255.0).to_bytes(),
            lambda: reference.decode(Latent.from_bytes(legacy_data)),
        ),
        f"Pillow JPEG q20 ({len(jpeg_data) * bpp:.2f} bpp)": (
            jpeg_encode,
            lambda: Image.open(io.BytesIO(jpeg_data)).load(),
        ),
    }
    if top:  # the part of the level's times that the 8-bit files spend on deflate instead
        codes = codec.encode(pixels, top).codes.numpy()
        coder, payload = codec.levels.coder(top), codec.levels.coder(top).compress(codes)
        contenders[f"{level}: its entropy coding alone"] = (
            lambda: coder.compress(codes),
            lambda: coder.decompress(payload, codes.shape),
        )
    median = median_times(contenders, args.rounds)

    kernel = f"kernel variant {fast.kernel_description()}"
    print(
        f"image 768x512, torch {torch.__version__}, {torch.get_num_threads()} threads, model {codec.name}, "
        f"{kernel}, median of {args.rounds} interleaved rounds"
    )
    print(f"{'':40} {'encode ms':>10} {'decode ms':>10}")
    for name, (enc, dec) in median.items():
        print(f"{name:40} {enc:10.1f} {dec:10.1f}")
    best, old = list(median.values())[:2]
    print(
        f"{level} against the 8-bit .pt files: encode {best[0] / old[0]:.2f}x, "
        f"decode {best[1] / old[1]:.2f}x (target <= 1.10x)"
    )
    loop = median["loop reference"]
    jpeg_name = next(name for name in median if name.startswith("Pillow"))
    print(f"decode speed-up over the loop reference: {loop[1] / best[1]:.1f}x (target >= 7x)")
    print(f"encode time / JPEG encode time: {best[0] / median[jpeg_name][0]:.2f}x (target <= 3x)")
    if args.profile:
        print_decode_profile(legacy, legacy_data)
    print()
    onnx_table(args.model, args.rounds)


if __name__ == "__main__":
    main()
