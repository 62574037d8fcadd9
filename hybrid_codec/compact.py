"""The compact latent file (`.hyb`) with numpy alone: its header, and its codes through the entropy coder.

The codec reads and writes the format through this module, and so does a runtime without torch
(an exported ONNX decoder, see `onnx_export.py` and the README): one implementation of it.
docs/format.md describes it byte by byte. It imports no torch, no model and no kernel.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from . import entropy
from .errors import CodecError

MAGIC = b"HYBC"
PACKED_VERSION = 1
HEADER = struct.Struct("<4sBB8sII")  # magic, version, level, weights hash, height, width; then a CRC-32
HEADER_BYTES = HEADER.size + 4
MAX_LATENT_VALUES = 2**32 // 16  # 4 channels at 1/64 of the largest image the header holds (2^32 pixels);
# the codec's own limit (`max_pixels`) is checked before a payload is decoded


@dataclass(frozen=True)
class Packed:
    """A compact file, read and checked: the header's fields and the entropy-coded codes."""

    level: int
    weights: str  # the hash of the weights that wrote it: their tables decode `payload`
    height: int
    width: int
    payload: bytes

    def latent_shape(self, channels: int, downscale: int = 8) -> tuple[int, int, int]:
        return channels, -(-self.height // downscale), -(-self.width // downscale)

    def codes(self, coder: entropy.EntropyCoder, channels: int, downscale: int = 8) -> np.ndarray:
        """The (C, h, w) int32 codes, entropy-decoded with the coder of this file's level."""
        try:
            return coder.decompress(self.payload, self.latent_shape(channels, downscale))
        except ValueError as exc:
            raise CodecError(f"corrupt file: {exc}") from None


def pack(weights: str, level: int, height: int, width: int, payload: bytes) -> bytes:
    """The compact file: the header, its CRC-32 (over header and payload), then the payload."""
    header = HEADER.pack(MAGIC, PACKED_VERSION, level, bytes.fromhex(weights), height, width)
    return header + struct.pack("<I", zlib.crc32(payload, zlib.crc32(header))) + payload


def unpack(data: bytes) -> Packed:
    """Check a compact file's every field; anything wrong is one CodecError naming it."""
    if len(data) < HEADER_BYTES:
        raise CodecError(f"truncated: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, level, weights, height, width = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError("not a hybrid-codec file")
    if version != PACKED_VERSION:
        raise CodecError(f"file format version {version} is not supported (this reads {PACKED_VERSION})")
    (crc,) = struct.unpack_from("<I", data, HEADER.size)
    payload = data[HEADER_BYTES:]
    if zlib.crc32(payload, zlib.crc32(data[: HEADER.size])) != crc:
        raise CodecError("corrupt or truncated file (its checksum does not match)")
    if level < 1:
        raise CodecError("quality level 0 does not exist (levels start at 1)")
    if height < 1 or width < 1 or -(-height // 8) * -(-width // 8) * 4 > MAX_LATENT_VALUES:
        raise CodecError(f"image size {height}x{width} is out of range")
    if len(payload) % 4:
        raise CodecError("corrupt file: the payload is not a whole number of 32-bit words")
    return Packed(level=level, weights=weights.hex(), height=height, width=width, payload=payload)
