"""ONNX export: the encoder and decoder as ONNX graphs, and runtime.json, what a runtime needs beside them.

The graphs come from the plain layers (`layers.py`, the reference the tests hold everything to),
never from `fast.py` and its compiled kernel, through `torch.onnx.export(dynamo=True)` at opset
`OPSET`, with batch, height and width left dynamic. ONNX has no copysign, and PyTorch's own
decomposition (`prims.signbit`) has no ONNX function either: `_translations` gives it one, exact
for -0.0 too, and a nan_to_num that onnxruntime runs faster than the exporter's. runtime.json holds
what the graphs do not: the input range and layout, the padding rule, each quality level's steps
and probability tables (the `.hyb` file's model, see docs/format.md and `compact.py`), the
weights' hash and the files' checksums.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from . import entropy
from .errors import CodecError, first_line
from .models import Autoencoder
from .paths import write_atomic
from .zoo import resolve_weights

OPSET = 18
FORMAT = "hybrid-codec-onnx"
ENCODER, DECODER, RUNTIME = "encoder.onnx", "decoder.onnx", "runtime.json"
NEEDS = ("onnx", "onnxscript")  # torch's dynamo exporter builds the graph with them


def export(name_or_path: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> dict:
    """Export a shipped model (by name) or a weights file into the folder `out`; returns runtime.json's fields.

    Refuses to overwrite any of the three files without `force`; each is written whole (runtime.json last)."""
    out = Path(out)
    targets = [out / name for name in (ENCODER, DECODER, RUNTIME)]
    if out.exists() and not out.is_dir():
        raise CodecError(f"{out}: exists and is not a folder")
    existing = [t for t in targets if t.exists()] if not force else []
    if existing:
        raise CodecError(f"{existing[0]} exists; use --force to overwrite")
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise CodecError(f"ONNX export needs {' and '.join(missing)}: pip install 'hybrid-codec[onnx]'")
    model = Autoencoder.from_pretrained(resolve_weights(name_or_path)).eval()
    graphs = {ENCODER: encoder_graph(model), DECODER: decoder_graph(model)}
    runtime = describe(model, {name: hashlib.sha256(data).hexdigest() for name, data in graphs.items()})
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CodecError(f"{out}: cannot create folder ({exc.strerror})") from None
    for name, data in graphs.items():
        write_atomic(out / name, data)
    write_atomic(out / RUNTIME, dumps(runtime).encode())
    return runtime


def dumps(runtime: dict) -> str:
    """Indented JSON with each list of plain values on one line: the tables alone are 27,648 numbers."""
    value = r'(?:[-+\d.eE]+|"[^"\n]*")'
    flat = re.compile(rf"\[\s*({value}(?:,\s*{value})*)\s*\]")
    return flat.sub(lambda m: "[" + ", ".join(re.findall(value, m.group(1))) + "]", json.dumps(runtime, indent=1))


def encoder_graph(model: Autoencoder) -> bytes:
    """Image (batch, 3, 8*h, 8*w) float in [0, 1] -> latent (batch, C, h, w), as ONNX bytes."""
    batch, h, w = torch.export.Dim("batch"), torch.export.Dim("h"), torch.export.Dim("w")
    f = model.config.downscale
    example = torch.rand(2, 3, 2 * f, 3 * f)
    dims, named = {0: batch, 2: f * h, 3: f * w}, {2: "h", 3: "w"}
    return to_onnx(model.encoder, example, "image", "latent", dims, _metadata(model), named)


def decoder_graph(model: Autoencoder) -> bytes:
    """Latent (batch, C, h, w) -> image (batch, 3, 8*h, 8*w) in [0, 1], as ONNX bytes."""
    batch, h, w = torch.export.Dim("batch"), torch.export.Dim("h"), torch.export.Dim("w")
    example = torch.randn(2, model.config.latent_channels, 2, 3)
    return to_onnx(model.decoder, example, "latent", "image", {0: batch, 2: h, 3: w}, _metadata(model))


def _metadata(model: Autoencoder) -> dict[str, str]:
    return {"model": model.config.name, "weights": model.weights_hash(), "runtime": RUNTIME}


def to_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    given: str,
    made: str,
    dims: dict,
    metadata: dict[str, str],
    output_axes: dict[int, str] | None = None,
) -> bytes:
    """`module` (one input `given`, one output `made`, `dims` of the input dynamic) as ONNX bytes;
    `output_axes` names the output's dynamic axes where the exporter's names (s39, s94) would say nothing."""
    quiet = logging.getLogger("torch.onnx")  # it warns that torchvision's operators are not registered
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=OPSET,
                input_names=[given],
                output_names=[made],
                dynamic_shapes={given: dims},
                custom_translation_table=_translations(),
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many kinds; its first line says what
        raise CodecError(f"ONNX export failed: {first_line(exc)}") from None
    finally:
        quiet.setLevel(level)
    shape = program.model.graph.outputs[0].shape
    program.rename_axes({shape[axis]: name for axis, name in (output_axes or {}).items()})
    proto = program.model_proto
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def _translations() -> dict:
    """ONNX functions for two ATen operators of the activation: copysign has none in the exporter, and its
    nan_to_num takes three `Where`s over the largest tensor, which onnxruntime runs slowly (profiled)."""
    from onnxscript import opset18 as op  # OPSET

    def copysign(magnitude, sign):
        """|magnitude| with the sign of `sign`, negative where sign < 0 or 1 / sign < 0 (-0.0), as a product."""
        negative = op.CastLike(op.Or(op.Less(sign, 0.0), op.Less(op.Reciprocal(sign), 0.0)), magnitude)
        return op.Mul(op.Abs(magnitude), op.Sub(op.CastLike(1.0, magnitude), op.Add(negative, negative)))

    def nan_to_num(x, nan: float = 0.0, posinf: float | None = None, neginf: float | None = None):
        """NaN -> `nan`, and +-inf -> the largest finite float32 (torch's defaults, the only ones the layers use)."""
        if posinf is not None or neginf is not None:
            raise NotImplementedError("nan_to_num with posinf or neginf is not translated")
        limit = float(np.finfo(np.float32).max)
        return op.Where(op.IsNaN(x), op.CastLike(nan, x), op.Clip(x, op.CastLike(-limit, x), op.CastLike(limit, x)))

    return {torch.ops.aten.copysign.Tensor: copysign, torch.ops.aten.nan_to_num.default: nan_to_num}


def describe(model: Autoencoder, checksums: dict[str, str]) -> dict:
    """runtime.json: how to feed the graphs and how their latents become files and back."""
    config = model.config
    f, channels = config.downscale, config.latent_channels
    image = {"dtype": "float32", "layout": "NCHW", "channels": "RGB", "range": [0.0, 1.0]}
    latent = {"dtype": "float32", "layout": "NCHW", "channels": channels, "latent_space": config.latent_space}
    runtime = {
        "format": FORMAT,
        "version": 1,
        "model": config.name,
        "weights": model.weights_hash(),
        "config": json.loads(config.to_json()),
        "opset": OPSET,
        "torch": torch.__version__,
        "sha256": checksums,
        "encoder": {
            "file": ENCODER,
            "input": {"name": "image", "shape": ["batch", 3, f"{f}*h", f"{f}*w"], **image},
            "output": {"name": "latent", "shape": ["batch", channels, "h", "w"], **latent},
        },
        "decoder": {
            "file": DECODER,
            "input": {"name": "latent", "shape": ["batch", channels, "h", "w"], **latent},
            "output": {"name": "image", "shape": ["batch", 3, f"{f}*h", f"{f}*w"], **image},
        },
        "padding": {
            "multiple": f,
            "sides": ["bottom", "right"],
            "mode": "edge",
            "rule": f"an H x W image is padded to multiples of {f} by repeating its last row and column "
            f"(numpy.pad mode 'edge'); the decoded image is cropped back to H x W, and 8-bit pixels are "
            f"round(clip(x, 0, 1) * 255)",
        },
    }
    levels = model.levels
    if levels is None:
        runtime["quantization"] = {
            "rule": "8-bit per image and channel: codes in 0..255, latent = low + code * step, "
            "with low and step stored in each .latent.pt file (docs/format.md)",
            "levels": [],
        }
        return runtime
    runtime["quantization"] = {
        "rule": "codes = clip(round((latent - offset) / steps), -code_limit, code_limit) per channel, "
        "with the steps of the file's level; latent = offset + codes * steps",
        "offset": levels.offset.double().tolist(),
        "code_limit": entropy.CODE_LIMIT,
        "levels": [
            {"level": i + 1, "steps": levels.steps[i].double().tolist(), "tables": levels.tables[i].tolist()}
            for i in range(levels.count)
        ],
    }
    runtime["entropy"] = {
        "coder": "constriction.stream.queue.RangeEncoder, Categorical(table, perfect=False); "
        "hybrid_codec.compact reads .hyb files with it (docs/format.md)",
        "tables": "per level: [channel][context][symbol] integers summing to total",
        "contexts": entropy.CONTEXTS,
        "symbols": entropy.SYMBOLS,
        "radius": entropy.RADIUS,
        "total": entropy.TOTAL,
    }
    return runtime


def max_difference(
    out: str | os.PathLike, name_or_path: str | os.PathLike, shape: tuple[int, int, int, int] = (2, 3, 40, 56)
) -> tuple[float, float] | None:
    """The largest difference of the exported encoder and decoder (onnxruntime on the CPU) from the
    plain PyTorch layers, on a random batch of `shape`; None where onnxruntime is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    model = Autoencoder.from_pretrained(resolve_weights(name_or_path)).eval()
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = model.encoder(image)
        decoded = model.decoder(latent)
    differences = []
    for name, given, expected in ((ENCODER, image, latent), (DECODER, latent, decoded)):
        session = onnxruntime.InferenceSession(str(Path(out) / name), providers=["CPUExecutionProvider"])
        (result,) = session.run(None, {session.get_inputs()[0].name: given.numpy()})
        differences.append(float(np.abs(result - expected.numpy()).max()))
    return differences[0], differences[1]
