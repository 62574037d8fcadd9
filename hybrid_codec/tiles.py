"""Huge images (scans, panoramas) coded in tiles, with the same result as coding them whole.

The encoder maps each 8x8 patch to its latent on its own, so tiles on the 8-pixel grid give the
whole image's latents exactly (the last tile is padded as the whole image is, by repeating its
last row and column). The decoder's k x k kernel reads the latents around each position, so a
tile of latents decoded with a halo of k // 2 latents (clipped at the image's edge, where the
decoder's own zero padding applies) gives exactly its part of the image. Only one tile is ever
in float; the image itself stays 8-bit, as Pillow holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from .images import tensor_to_image

TILE = 2048
"""Pixels per tile side (a multiple of 8): 4 megapixels, whose float work takes a few hundred MB."""


def check_tile(tile: int, factor: int = 8) -> int:
    if type(tile) is not int or tile < factor or tile % factor:
        raise ValueError(f"the tile size must be a positive multiple of {factor}, not {tile!r}")
    return tile


def grid(height: int, width: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of each tile, row by row; the last row and column may be smaller."""
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            yield top, left, min(top + tile, height), min(left + tile, width)


def encode_tiled(
    encode: Callable[[torch.Tensor], torch.Tensor], image: Image.Image | np.ndarray, tile: int, factor: int = 8
) -> torch.Tensor:
    """An RGB PIL image or HxWx3 uint8 array -> latents (1, C, ceil(H/8), ceil(W/8)), one tile at a time.

    `encode` is the codec's `encode_tensor`: (1, 3, h, w) uint8 -> (1, C, ceil(h/8), ceil(w/8)).
    """
    check_tile(tile, factor)
    width, height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    latents = None
    for top, left, bottom, right in grid(height, width, tile):
        if isinstance(image, Image.Image):
            pixels = np.array(image.crop((left, top, right, bottom)))  # writable, as torch wants
        else:
            pixels = np.ascontiguousarray(image[top:bottom, left:right])
        part = encode(torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0))
        if latents is None:
            latents = part.new_empty(1, part.shape[1], -(-height // factor), -(-width // factor))
        latents[..., top // factor : top // factor + part.shape[2], left // factor : left // factor + part.shape[3]] = (
            part
        )
    return latents


def decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    height: int,
    width: int,
    tile: int,
    halo: int = 1,
    factor: int = 8,
) -> Image.Image:
    """Latents (1, C, h, w) -> the RGB image of `height` x `width` they code, one tile at a time.

    `decode` is the codec's `decode_tensor`: (1, C, h, w) -> (1, 3, 8h, 8w) in [0, 1]; `halo` is
    its kernel's reach in latents (k // 2).
    """
    check_tile(tile, factor)
    h, w = latents.shape[-2:]
    canvas = Image.new("RGB", (width, height))
    step = tile // factor
    for top, left, bottom, right in grid(h, w, step):
        above, before = min(halo, top), min(halo, left)
        part = latents[..., top - above : min(bottom + halo, h), left - before : min(right + halo, w)]
        image = decode(part)
        y, x = factor * above, factor * before
        rows = min(factor * (bottom - top), height - factor * top)
        columns = min(factor * (right - left), width - factor * left)
        canvas.paste(tensor_to_image(image[0, :, y : y + rows, x : x + columns]), (factor * left, factor * top))
    return canvas
