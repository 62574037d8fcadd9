"""`hybrid-codec info`: what a latent file or a weights file holds, or what this installation runs."""

from __future__ import annotations

from pathlib import Path

from . import bitstream, compact
from .compact import Packed
from .errors import CodecError
from .evaluation import bits_per_pixel
from .inputs import check_input
from .zoo import SHIPPED, resolve_weights


def describe_runtime() -> dict[str, object]:
    """What this installation runs on, as label -> value: versions, threads, the CPU kernel's variant."""
    from importlib.metadata import version

    import torch

    from .fast import kernel_description

    return {
        "hybrid-codec": version("hybrid-codec"),
        "torch": f"{torch.__version__}, {torch.get_num_threads()} CPU threads",
        "CPU kernel": kernel_description(),
    }


def layer_text(layer) -> str:
    """A layer as its constructor call would read: its class and arguments, without its parameters."""
    return f"{type(layer).__name__}({layer.extra_repr()})"


def describe(path: Path) -> dict[str, object]:
    """What a latent file or a weights file holds, as label -> value."""
    if str(path) in SHIPPED and not path.is_file():  # a shipped name works wherever a weights file does
        path = resolve_weights(str(path))
    check_input(path)
    if path.suffix == ".ckpt":
        return describe_checkpoint(path)
    if path.suffix == ".safetensors":
        from .models import Autoencoder, weights_bytes

        model = Autoencoder.from_pretrained(path)
        c = model.config
        return {
            "kind": "hybrid-codec weights",
            "model": c.name,
            "latent space": c.latent_space,
            "weights hash": model.weights_hash(),
            "encoder": f"{layer_text(model.encoder.conv)}: {weights_bytes(model.encoder) / 1000:.1f} KB",
            "decoder": f"{layer_text(model.decoder.conv)} + PixelShuffle({c.downscale}): "
            f"{weights_bytes(model.decoder) / 1000:.1f} KB",
            "quality levels": str(c.quality_levels) if c.quality_levels else "none (8-bit min/max latents)",
            "config": c.to_json(),
        }
    latent = bitstream.read_file(path)
    size = path.stat().st_size
    if isinstance(latent, Packed):
        return {
            "kind": f"hybrid-codec compact file (format {compact.PACKED_VERSION})",
            "quality level": latent.level,
            "weights hash": latent.weights,
            "image size": f"{latent.width}x{latent.height}",
            "file size": f"{size:,} bytes ({compact.HEADER_BYTES} of header)",
            "bits per pixel": f"{bits_per_pixel(size, latent.height, latent.width):.3f}",
        }
    version = bitstream.VERSION if latent.level is None else bitstream.LEVEL_VERSION
    return {
        "kind": f"hybrid-codec latent (.pt format {version})",
        "model": latent.model,
        "weights hash": latent.weights,
        "latent space": latent.latent_space,
        "image size": f"{latent.width}x{latent.height}",
        "latent shape": "x".join(str(n) for n in latent.codes.shape),
        "quality level": latent.level if latent.level is not None else "none (8-bit min/max codes)",
        "file size": f"{size:,} bytes",
        "bits per pixel": f"{bits_per_pixel(size, latent.height, latent.width):.3f}",
    }


def describe_checkpoint(path: Path) -> dict[str, object]:
    """What a training checkpoint holds: its recipe, model, step, and the command that goes on."""
    from .config import CodecConfig
    from .training import load_checkpoint

    state = load_checkpoint(path)
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise CodecError(f"{path}: not a hybrid-codec training checkpoint")
    options = state.get("options", {})
    config = CodecConfig.from_json(state["config"])
    return {
        "kind": f"training checkpoint ({state.get('format', 'unknown recipe')})",
        "model": config.name,
        "step": f"{state['step']:,} of {options.get('steps', '?'):,}"
        if isinstance(options.get("steps"), int)
        else state["step"],
        "trained for": f"{state.get('seconds', 0) / 60:.1f} min",
        "writes": options.get("out", "?"),
        "resume": f"the same command with --resume {path}",
        "config": config.to_json(),
    }


def human_bytes(n: int) -> str:
    return f"{n / 1000:.1f} KB" if n >= 1000 else f"{n} B"
