"""Stable Diffusion pairing: SD-space latents from the tiny `sd` encoder, and decoding them with the SD VAE.

diffusers is imported inside the functions that need it, never at module level: `import hybrid_codec`
and the plain encode/decode/info paths stay fast and work without it.

Latent conventions: the `sd` model's encoder gives *raw* SD VAE latents (what `AutoencoderKL.decode`
takes); the UNet's space is raw * SD_SCALING_FACTOR (0.18215, SD 1.x and 2.x). `scaled=True` means the
UNet's space everywhere in this module, `scaled=False` raw latents.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from .bitstream import Latent, read_file
from .codec import Codec, Codecs, load_codec, pick_device
from .compact import Packed
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
    text = lines[0].rstrip(".") if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_local(source: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else is meant as a path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """diffusers and huggingface_hub log and warn while loading; a failure is reported as one line instead."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging

    levels = diffusers_logging.get_verbosity(), hub_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # its retry messages ("Retrying in 8s") would break the one-line report
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _check_hub_reachable(timeout: float = 5.0) -> None:
    """Fail fast when the Hub's host cannot be reached, instead of huggingface_hub's minute of retries.

    Skipped behind a proxy, where a direct connection says nothing.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise OSError(f"cannot reach {host} ({exc.strerror or exc})") from None


def _from_hub(cls, source: str):
    """The Hugging Face cache first (instant, works offline), then the Hub unless HF_HUB_OFFLINE is set."""
    try:
        return cls.from_pretrained(source, local_files_only=True)
    except Exception:
        if _hub_offline():
            raise
    _check_hub_reachable()
    return cls.from_pretrained(source)


def load_vae(
    kind: str = "sd", source: str | os.PathLike | None = None, device: str | torch.device = "auto", flag: str = "--vae"
):
    """The SD VAE (`kind="sd"`, an AutoencoderKL) or TAESD (`kind="taesd"`, an AutoencoderTiny), in eval mode.

    `source`: a Hub id (looked up in the Hugging Face cache first, as diffusers does; HF_HUB_OFFLINE
    is respected), a local diffusers folder, or (AutoencoderKL only) a single .safetensors/.ckpt file.
    Any failure is one CodecError line saying what was tried and how to point at local weights (with
    `flag`, the option that names them in the command that called).
    """
    if kind not in VAE_KINDS:
        raise CodecError(f"unknown VAE kind {kind!r}; expected one of {VAE_KINDS}")
    source = str(source) if source is not None else DEFAULT_VAE[kind]
    chosen = pick_device(device)
    try:
        import diffusers
    except ImportError:
        raise CodecError("the SD VAE and TAESD need diffusers: pip install diffusers") from None
    cls = diffusers.AutoencoderKL if kind == "sd" else diffusers.AutoencoderTiny
    path = Path(source).expanduser()
    if not path.exists() and _looks_local(source):
        raise CodecError(f"{source}: no such VAE folder or file")
    if path.is_file() and kind != "sd":
        raise CodecError(f"{source}: TAESD loads from a diffusers folder or Hub id, not a single file")
    try:
        with _quiet_hub():
            if path.is_file():
                vae = cls.from_single_file(str(path))
            elif path.is_dir():
                vae = cls.from_pretrained(str(path))
            else:
                vae = _from_hub(cls, source)
    except CodecError:
        raise
    except Exception as exc:  # diffusers / huggingface_hub / safetensors raise many types; all mean "not loadable"
        where = "local folder" if path.is_dir() else "file" if path.is_file() else "Hub id"
        hint = ""
        if not path.exists():
            offline = " (HF_HUB_OFFLINE is set)" if _hub_offline() else ""
            hint = (
                f"; it is not in the Hugging Face cache and cannot be downloaded here{offline}: download it once "
                f"(hf download {source}) or pass {flag} /path/to/folder with its config.json and weights"
            )
        raise CodecError(
            f"could not load the {_VAE_LABEL[kind]} from {where} {source!r}: {type(exc).__name__}: {_short(exc)}{hint}"
        ) from None
    return vae.to(chosen).eval().requires_grad_(False)


# ---------------------------------------------------------------- SD latents from the tiny encoder

_CODECS: dict[tuple[str, str], Codec] = {}


def sd_codec(model: str | os.PathLike = "sd", device: str | torch.device = "auto") -> Codec:
    """The SD-space codec (shipped `sd` or a weights file), loaded once per (model, device)."""
    key = (str(model), str(pick_device(device)))
    if key not in _CODECS:
        codec = load_codec(model, device)
        if codec.config.latent_space != "sd":
            raise CodecError(
                f"model {codec.name!r} works in the {codec.config.latent_space!r} latent space, not SD's; "
                "use the shipped 'sd' model or weights made by `hybrid-codec distill`"
            )
        _CODECS[key] = codec
    return _CODECS[key]


def _as_items(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (list, tuple)):
        if not images:
            raise CodecError("no images given")
        return list(images)
    return [images]


def encode_latents(
    images: ImageLike | Sequence[ImageLike],
    scaled: bool = True,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    model: str | os.PathLike = "sd",
) -> torch.Tensor:
    """Images -> SD latents (B, 4, ceil(H/8), ceil(W/8)) float32, on the device that computed them.

    `images`: a path, PIL image, uint8 HxWx3 array, float tensor in [0, 1] ((3, H, W) or a batch
    (B, 3, H, W); not diffusers' [-1, 1]), or a list of them. All must have one size: one tensor
    holds one size, as a diffusion batch does (encode other sizes in separate calls). `scaled`:
    multiplied by SD_SCALING_FACTOR, i.e. the UNet's space that diffusers pipelines take; else raw
    VAE space. Sides that are not multiples of 8 are padded by repeating the last row/column.
    """
    if batch_size < 1:
        raise CodecError("batch_size must be positive")
    codec = sd_codec(model, device)
    outputs, size = [], None
    items = _as_items(images)
    for first in range(0, len(items), batch_size):
        tensors = [image_to_tensor(item) for item in items[first : first + batch_size]]
        for tensor in tensors:
            size = tensor.shape[-2:] if size is None else size
            if tensor.shape[-2:] != size:
                raise CodecError(
                    f"images differ in size ({size[1]}x{size[0]} and {tensor.shape[-1]}x{tensor.shape[-2]}): "
                    "one latent tensor holds one size; encode each size separately"
                )
        for chunk in torch.cat(tensors).split(batch_size):
            outputs.append(codec.encode_tensor(chunk).float())
    latents = torch.cat(outputs)
    return latents * SD_SCALING_FACTOR if scaled else latents


def _vae_kind(vae: object) -> str:
    name = type(vae).__name__
    if name == "AutoencoderTiny":
        return "taesd"
    if hasattr(vae, "decode") and hasattr(vae, "config"):
        return "sd"
    raise CodecError(f"cannot decode with a {name}: give 'hybrid', 'taesd', a Hub id, a path or a diffusers VAE")


@torch.no_grad()
def vae_decode(vae, raw: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Raw SD latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [0, 1] with an AutoencoderKL or AutoencoderTiny.

    AutoencoderKL decodes raw latents; TAESD was trained on the UNet's (scaled) latents, which its
    config says with scaling_factor 1.0: the input is raw * SD factor / its own factor.
    """
    parameter = next(vae.parameters())
    factor = 1.0
    if _vae_kind(vae) == "taesd":
        factor = SD_SCALING_FACTOR / float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    images = []
    for chunk in raw.split(batch_size):
        sample = vae.decode(chunk.to(parameter.device, parameter.dtype) * factor).sample
        if sample.shape[-2:] != (8 * raw.shape[-2], 8 * raw.shape[-1]) or sample.shape[1] != 3:
            raise CodecError(
                f"this VAE decodes {tuple(raw.shape[1:])} latents to {tuple(sample.shape[1:])}, not to 3 x 8h x 8w: "
                "it is not a Stable Diffusion VAE"
            )
        images.append(((sample.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(images)


def decode_latents(
    latents: torch.Tensor,
    vae: str | os.PathLike | object = DEFAULT_VAE["sd"],
    scaled: bool = True,
    batch_size: int = 4,
    device: str | torch.device = "auto",
    model: str | os.PathLike = "sd",
) -> list[Image.Image]:
    """SD latents (B, 4, h, w) or (4, h, w) -> PIL images (8h x 8w).

    `vae`: "hybrid" (the `sd` model's own tiny decoder: fast, lower quality), "taesd" (TAESD from
    the Hub), a Hub id or local path of an AutoencoderKL, or an already loaded diffusers VAE.
    `scaled`: the latents are in the UNet's space (raw * SD_SCALING_FACTOR), as `encode_latents` gives.
    """
    if not isinstance(latents, torch.Tensor):
        raise CodecError(f"expected a latent tensor, got {type(latents).__name__}")
    if latents.dim() == 3:
        latents = latents[None]
    if latents.dim() != 4 or latents.shape[1] != 4:
        raise CodecError(f"expected SD latents (B, 4, h, w), got {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise CodecError("the latents hold NaN or infinite values")
    raw = latents.float() / SD_SCALING_FACTOR if scaled else latents.float()
    if isinstance(vae, (str, os.PathLike)) and str(vae) == "hybrid":
        codec = sd_codec(model, device)
        images = torch.cat([codec.decode_tensor(chunk).cpu() for chunk in raw.split(batch_size)])
    else:
        if isinstance(vae, (str, os.PathLike)):
            vae = load_vae("taesd", None, device) if str(vae) == "taesd" else load_vae("sd", vae, device)
        images = vae_decode(vae, raw, batch_size)
    return [tensor_to_image(image) for image in images]


# ---------------------------------------------------------------- latent files through the SD VAE


class LatentFileDecoder:
    """Decodes SD-space latent files with the SD VAE or TAESD, loading the VAE once for many files."""

    def __init__(
        self,
        kind: str = "sd",
        vae: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        model: str | None = None,
    ):
        self.kind, self.source, self.device = kind, vae, pick_device(device)  # a bad device: one error up front
        self.vae = None  # loaded (perhaps downloaded) at the first latent that it can decode, not before
        self.codecs = Codecs(model, "cpu")  # a compact file's codes need the tables of the weights that wrote it

    def check(self, latent: Latent) -> None:
        """Refuse a latent that no SD VAE decodes, before any VAE is loaded."""
        if latent.latent_space != "sd":
            raise CodecError(
                f"this latent is in the {latent.latent_space!r} latent space (model {latent.model!r}); the SD VAE "
                "decodes only SD-space latents: encode with --model sd, or decode with --decoder hybrid"
            )
        if latent.codes.shape[0] != 4:
            raise CodecError(f"SD latents have 4 channels, this one has {latent.codes.shape[0]}")

    def decode(self, latent: Latent | Packed | str | os.PathLike) -> Image.Image:
        """A latent file (or Latent) of the `sd` model -> PIL image of the original size."""
        if not isinstance(latent, Latent | Packed):
            latent = read_file(latent)
        if isinstance(latent, Packed):
            latent = self.codecs.for_file(latent).load(latent)
        self.check(latent)
        if self.vae is None:
            self.vae = load_vae(self.kind, self.source, self.device)
        image = vae_decode(self.vae, latent.dequantize())
        return tensor_to_image(image[0, :, : latent.height, : latent.width])
