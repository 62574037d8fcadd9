"""Stable Diffusion pairing: SD-space latents from the tiny `sd` encoder, and decoding them with the SD VAE.

diffusers is imported inside the functions that need it, never at module level: `import hybrid_codec`
and the plain encode/decode/info paths stay fast and work without it.

Latent conventions: the `sd` model's encoder gives *raw* SD VAE latents (what `AutoencoderKL.decode`
takes); the UNet's space is raw * scaling_factor (0.18215 for SD 1.x). `scaled=True` means the
UNet's space everywhere in this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .errors import CodecError
from .images import ImageLike, image_to_tensor, tensor_to_image

SD_SCALING_FACTOR = 0.18215
"""SD 1.x / 2.x VAE scaling factor: UNet latents = raw VAE latents * this."""

VAE_KINDS = ("sd", "taesd")
DEFAULT_VAE = {"sd": "stabilityai/sd-vae-ft-mse", "taesd": "madebyollin/taesd"}
_VAE_LABEL = {"sd": "SD VAE (diffusers.AutoencoderKL)", "taesd": "TAESD (diffusers.AutoencoderTiny)"}


def _short(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception, shortened: diffusers' messages run to paragraphs."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_local(source: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else is meant as a path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def load_vae(kind: str = "sd", source: str | os.PathLike | None = None, device: str | torch.device = "auto"):
    """The SD VAE (`kind="sd"`, an AutoencoderKL) or TAESD (`kind="taesd"`, an AutoencoderTiny), in eval mode.

    `source`: a Hub id (looked up in the Hugging Face cache first, as diffusers does; HF_HUB_OFFLINE
    is respected), a local diffusers folder, or (AutoencoderKL only) a single .safetensors/.ckpt file.
    Any failure is one CodecError line saying what was tried and how to point at local weights.
    """
    from .codec import pick_device

    if kind not in VAE_KINDS:
        raise CodecError(f"unknown VAE kind {kind!r}; expected one of {VAE_KINDS}")
    source = str(source) if source is not None else DEFAULT_VAE[kind]
    chosen = pick_device(device)
    try:
        import diffusers
    except ImportError:
        raise CodecError("decoding with the SD VAE needs diffusers: pip install diffusers") from None
    cls = diffusers.AutoencoderKL if kind == "sd" else diffusers.AutoencoderTiny
    path = Path(source).expanduser()
    if not path.exists() and _looks_local(source):
        raise CodecError(f"{source}: no such VAE folder or file")
    try:
        if path.is_file():
            if kind != "sd":
                raise CodecError(f"{source}: TAESD loads from a diffusers folder or Hub id, not a single file")
            vae = cls.from_single_file(str(path))
        else:
            vae = cls.from_pretrained(str(path) if path.is_dir() else source)
    except CodecError:
        raise
    except Exception as exc:  # diffusers / huggingface_hub / safetensors raise many types; all mean "not loadable"
        where = "local folder" if path.is_dir() else "file" if path.is_file() else "Hub id"
        hint = ""
        if not path.exists():
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
            hint = (
                f"; it is not in the Hugging Face cache and cannot be downloaded here{offline}: download it once "
                f"(huggingface-cli download {source}) or pass --vae /path/to/folder with its config.json and weights"
            )
        raise CodecError(
            f"could not load the {_VAE_LABEL[kind]} from {where} {source!r}: {type(exc).__name__}: {_short(exc)}{hint}"
        ) from None
    return vae.to(chosen).eval().requires_grad_(False)
