"""Latent files: the compact quality-level file, and the `.pt` dict that `torch.load` reads.

The compact file (`.hyb`, `compact.pack` / `compact.unpack`, see docs/format.md) is a 26-byte
header and the range-coded codes; its tables are the model's, so the codec decodes it. The `.pt` file is a small
dict written with `torch.save`, read with `torch.load(weights_only=True)`. Reading either needs
no model and no kernel.

`.pt` fields (format version 1: 8-bit codes from each image's own min/max):

    format        "hybrid-codec-latent"
    version       1
    model         name of the model that made it ("native", "sd", ...)
    weights       hash of that model's config and weights (`Autoencoder.weights_hash`)
    latent_space  "native" or "sd"
    height, width size of the original image; the decoded image is cropped back to it
    shape         [channels, h, w] of the latent (h = ceil(height / 8), w = ceil(width / 8))
    bits          bits per latent value (8)
    low, step     per channel: value = low + code * step
    coding        how `payload` holds the codes: "deflate-delta" (zlib of row-wise differences)
    payload       1-D uint8 tensor holding the coded bytes (a tensor is stored raw; pickled
                  bytes would be stored as latin-1 text, 1.5x larger)

Only plain Python values and bytes are stored: no pickled classes of this project, no code.
The legacy (non-zip) torch.save layout keeps the container to about 500 bytes.

Version 2 (a quality-level latent as a `.pt`) has the same first seven fields, then `shape`,
`level`, `low` (the model's offset), `step` (the level's steps) and `codes`, an int16 tensor.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from isal import isal_zlib

from .compact import MAGIC, MAX_LATENT_VALUES, Packed, unpack
from .config import LATENT_SPACES
from .errors import CodecError
from .inputs import read_input
from .paths import write_atomic
from .quantize import dequantize

FORMAT = "hybrid-codec-latent"
VERSION = 1  # 8-bit min/max codes
LEVEL_VERSION = 2  # a quality level's integer codes
CODINGS = ("deflate-delta",)
MAX_LATENT_FILE_BYTES = MAX_LATENT_VALUES * 4  # more than 2 bytes a value: not a file this writes


def _encode_codes(codes: np.ndarray) -> bytes:
    """Row-wise differences (mod 256) turn smooth latents into small numbers that deflate packs well.

    ISA-L's deflate (level 1) packs them 1% smaller than zlib's level 9, ten times faster: 0.1 ms
    for a 768x512 image against 1.2 ms, which was a fifth of the encode. Any inflater reads it.
    LZMA packs 2-3% smaller but takes ten times longer than the whole model; see docs/format.md.
    """
    delta = np.diff(codes, axis=-1, prepend=np.uint8(0))  # uint8 arithmetic wraps mod 256
    return isal_zlib.compress(delta.tobytes(), 1)


def _decode_codes(payload: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(payload, math.prod(shape) + 1)  # bounded: no decompression bomb
    except zlib.error:
        raise CodecError("corrupt latent payload (it does not decompress)") from None
    if not inflater.eof and len(raw) <= math.prod(shape):
        raise CodecError("truncated latent payload")
    if len(raw) != math.prod(shape):
        raise CodecError(f"corrupt latent payload: {len(raw)} values where {math.prod(shape)} were expected")
    delta = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    return np.cumsum(delta, axis=-1, dtype=np.uint8)  # uint8 arithmetic wraps mod 256


@dataclass
class Latent:
    """An encoded image: 8-bit codes plus what is needed to dequantize and crop."""

    codes: torch.Tensor  # (C, h, w) uint8
    low: torch.Tensor  # (C,) float32
    step: torch.Tensor  # (C,) float32
    height: int
    width: int
    model: str
    weights: str
    latent_space: str = "native"
    level: int | None = None  # the quality level (1 = smallest file), or None for 8-bit min/max codes

    def __post_init__(self) -> None:
        """Refuse what no file can hold: float or empty codes, a size its shape does not cover, odd steps."""
        codes = self.codes
        if not isinstance(codes, torch.Tensor) or codes.device.type == "meta":
            raise CodecError(f"latent codes must be a tensor with data, not {type(codes).__name__} {codes!r:.40}")
        if codes.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
            raise CodecError(f"latent codes must be integers (uint8, or int16/int32 for a level), not {codes.dtype}")
        if self.level is None and codes.dtype != torch.uint8:
            raise CodecError(f"8-bit latent codes must be uint8, not {codes.dtype}")
        for name in ("height", "width"):
            if type(getattr(self, name)) is not int:
                raise CodecError(f"latent {name} must be an integer, not {getattr(self, name)!r}")
        if codes.dim() != 3:
            raise CodecError(f"latent codes must be (C, h, w), not {tuple(codes.shape)}")
        check_shape(list(codes.shape), self.height, self.width)
        for name in ("low", "step"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.device.type == "meta" or value.shape != codes.shape[:1]:
                raise CodecError(f"latent {name} must be a ({codes.shape[0]},) tensor")
            if not torch.isfinite(value).all():
                raise CodecError(f"latent {name} holds NaN or infinite values")
        if not (self.step > 0).all():
            raise CodecError("latent step must be positive")
        if self.level is not None and (type(self.level) is not int or not 1 <= self.level <= 255):
            raise CodecError(f"latent level must be an integer from 1 to 255, not {self.level!r}")
        if self.level is not None and codes.numel() and codes.abs().max() > 32767:
            raise CodecError("latent codes of a level must fit in 16 bits")

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.codes.shape))
        level = f", level={self.level}" if self.level is not None else ""
        return f"Latent({shape} codes of a {self.height}x{self.width} image, model={self.model!r}{level})"

    def dequantize(self) -> torch.Tensor:
        """The latent as a float tensor (1, C, h, w)."""
        return dequantize(self.codes[None], self.low[None], self.step[None])

    def to_dict(self) -> dict:
        common = {
            "format": FORMAT,
            "version": VERSION if self.level is None else LEVEL_VERSION,
            "model": self.model,
            "weights": self.weights,
            "latent_space": self.latent_space,
            "height": self.height,
            "width": self.width,
            "shape": list(self.codes.shape),
            "low": self.low.double().tolist(),
            "step": self.step.double().tolist(),
        }
        if self.level is not None:
            return {**common, "level": self.level, "codes": self.codes.to(torch.int16).contiguous()}
        payload = np.frombuffer(_encode_codes(self.codes.cpu().numpy()), np.uint8).copy()
        return {**common, "bits": 8, "coding": CODINGS[0], "payload": torch.from_numpy(payload)}

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.to_dict(), buffer, _use_new_zipfile_serialization=False)
        return buffer.getvalue()

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a crash leaves either no file or the whole file."""
        path = Path(path)
        write_atomic(path, self.to_bytes())
        return path

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "latent") -> Latent:
        try:
            with warnings.catch_warnings():  # a damaged header makes torch warn about odd pickle protocols
                warnings.simplefilter("ignore")
                fields = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # damaged bytes make the unpickler raise almost anything (struct.error, ...)
            truncated = (EOFError, zipfile.BadZipFile, struct.error)
            kind = "truncated or corrupt" if isinstance(exc, truncated) else "not readable"
            raise CodecError(f"{where}: not a hybrid-codec latent file ({kind})") from None
        try:
            return cls.from_dict(fields)
        except CodecError as exc:
            raise CodecError(f"{where}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Latent:
        """A `.pt` latent file (a compact file needs its model's tables: `Codec.load` reads both)."""
        latent = read_file(path)
        if isinstance(latent, Packed):
            raise CodecError(f"{path}: a compact file; read it with its model (Codec.load)")
        return latent

    @classmethod
    def from_dict(cls, fields: object) -> Latent:
        """Check every field; anything unexpected is refused with the field's name."""
        if not isinstance(fields, dict) or fields.get("format") != FORMAT:
            raise CodecError("not a hybrid-codec latent file")
        version = fields.get("version")
        if type(version) is not int or version not in (VERSION, LEVEL_VERSION):  # not True, not 1.0
            raise CodecError(f"latent format version {version!r} is not supported (this reads 1 and 2)")

        def field(name: str, kind: type | tuple[type, ...]):
            if name not in fields:
                raise CodecError(f"latent file has no {name!r} field")
            value = fields[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise CodecError(f"latent field {name!r} has the wrong type ({type(value).__name__})")
            return value

        model, weights, space = field("model", str), field("weights", str), field("latent_space", str)
        height, width, shape = field("height", int), field("width", int), field("shape", list)
        low, step = field("low", list), field("step", list)
        if space not in LATENT_SPACES:
            raise CodecError(f"unknown latent space {space!r}")
        check_shape(shape, height, width)
        channels, h, w = shape
        for name, values in (("low", low), ("step", step)):
            if len(values) != channels or not all(isinstance(v, float) and math.isfinite(v) for v in values):
                raise CodecError(f"latent field {name!r} must hold {channels} finite numbers")
        if not all(v > 0 for v in step):
            raise CodecError("latent field 'step' must be positive")
        level = None
        if version == VERSION:
            bits, coding, payload = field("bits", int), field("coding", str), field("payload", torch.Tensor)
            if coding not in CODINGS or bits != 8:
                raise CodecError(f"unsupported latent coding {coding!r} with {bits} bits")
            if payload.dtype != torch.uint8 or payload.dim() != 1:
                kind = f"{payload.dtype} {list(payload.shape)}"
                raise CodecError(f"latent field 'payload' must be a 1-D uint8 tensor, not {kind}")
            codes = torch.from_numpy(_decode_codes(payload.numpy().tobytes(), (channels, h, w)).copy())
        else:
            level, codes = field("level", int), field("codes", torch.Tensor)
            if not 1 <= level <= 255:
                raise CodecError(f"latent field 'level' must be 1 to 255, not {level}")
            if codes.dtype != torch.int16 or list(codes.shape) != shape:
                raise CodecError(f"latent field 'codes' must be an int16 tensor of shape {shape}")
            codes = codes.to(torch.int32)
        return cls(
            codes=codes,
            low=torch.tensor(low, dtype=torch.float32),
            step=torch.tensor(step, dtype=torch.float32),
            height=height,
            width=width,
            model=model,
            weights=weights,
            latent_space=space,
            level=level,
        )


def check_shape(shape: list, height: int, width: int) -> None:
    """A latent shape of three positive integers that fits the image size, and not too large."""
    if len(shape) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise CodecError(f"latent shape {shape!r} is not three positive integers")
    _, h, w = shape
    if math.prod(shape) > MAX_LATENT_VALUES:
        raise CodecError(f"latent shape {shape} is too large")
    if not (0 < height <= 8 * h and 0 < width <= 8 * w and height > 8 * (h - 1) and width > 8 * (w - 1)):
        raise CodecError(f"image size {height}x{width} does not match latent shape {shape}")


def read(data: bytes, where: str = "latent") -> Latent | Packed:
    """Either kind of latent file, by its first bytes."""
    if data[: len(MAGIC)] == MAGIC:
        try:
            return unpack(data)
        except CodecError as exc:
            raise CodecError(f"{where}: {exc}") from None
    return Latent.from_bytes(data, where)


def read_file(path: str | os.PathLike) -> Latent | Packed:
    """`read` of a file, with one clear error for a missing, unreadable or folder path."""
    if not isinstance(path, str | os.PathLike):
        raise CodecError(f"cannot read a latent from a {type(path).__name__}: give a Latent, bytes or a path")
    return read(read_input(path, "file", MAX_LATENT_FILE_BYTES), where=str(path))
