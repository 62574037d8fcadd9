"""Training data: random crops of every image in a folder, reproducible from (seed, sample index).

Sample i of a run is fully determined by the seed and i, so a resumed run sees exactly the
crops an uninterrupted run would, whatever the number of loader workers or processes.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import CodecError
from .images import MAX_PIXELS, find_images, open_image, pixels_to_tensor, quiet_stderr
from .inputs import open_input

MIN_SIDE = 16
"""Images with a side shorter than this are skipped: they hold no useful 8x8 structure."""
DECODER_SCALES = 5
"""A decoder stage's scales: this many, geometrically from --decoder-min-scale to 1."""


def usable_images(folder: str | Path, warn=print) -> list[Path]:
    """The images below `folder` that decode fully and are large enough; one warning per skipped file.

    Every image is decoded once here (in threads: Pillow releases the GIL), because only a full
    decode finds a truncated JPEG, BMP or TIFF, and a bad file must be skipped now, not crash a
    loader worker hours into a run.
    """
    paths = find_images(folder)
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        warnings.simplefilter("ignore")  # Pillow's EXIF/ICC chatter; the threads share this filter
        problems = list(pool.map(_problem, paths))
    usable = []
    for path, problem in zip(paths, problems, strict=True):
        if problem:
            warn(f"skipping {path}: {problem}")
        else:
            usable.append(path)
    if not usable:
        raise CodecError(f"{folder}: no usable images (png/jpg/webp/bmp/tiff of at least {MIN_SIDE}x{MIN_SIDE})")
    return usable


def _problem(path: Path) -> str | None:
    """Why an image file cannot be trained on, or None."""
    try:
        with quiet_stderr(), open_input(path, "image") as file, Image.open(file) as image:
            width, height = image.size
            if min(width, height) < MIN_SIDE:
                return f"{width}x{height} is smaller than {MIN_SIDE}x{MIN_SIDE}"
            if width * height > MAX_PIXELS:
                return f"{width}x{height} is larger than {MAX_PIXELS:,} pixels"
            image.load()
    except Exception as exc:  # any unreadable file is skipped, never fatal
        return f"unreadable ({type(exc).__name__})"
    return None


class RandomCrops(torch.utils.data.Dataset):
    """Item i: a random crop of one image, randomly rescaled and flipped, as (3, crop, crop) in [0, 1].

    Each worker keeps the images it has decoded, so PNG decoding happens once per worker.
    `min_scale` < 1 also shows the model downscaled views, like smaller photos of the same scenes.
    """

    def __init__(self, paths: list[Path], crop: int, seed: int, min_scale: float = 1.0) -> None:
        self.paths, self.crop, self.seed, self.min_scale = paths, crop, seed, min_scale
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return 2**62  # endless: the sampler decides which indices are drawn

    def _image(self, index: int) -> np.ndarray:
        if index not in self._cache:
            self._cache[index] = np.asarray(open_image(self.paths[index]))
        return self._cache[index]

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, i])
        epoch, position = divmod(i, len(self.paths))
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.paths))
        image = self._image(int(order[position]))
        height, width = image.shape[:2]
        scale = math.exp(rng.uniform(math.log(self.min_scale), 0.0)) if self.min_scale < 1 else 1.0
        side = min(height, width, max(self.crop, round(self.crop / scale)))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        patch = image[top : top + side, left : left + side]
        if side < self.crop:  # a small image: pad it to the crop size
            patch = np.pad(patch, ((0, self.crop - side), (0, self.crop - side), (0, 0)), mode="edge")
        elif side > self.crop:
            patch = np.asarray(Image.fromarray(patch).resize((self.crop, self.crop), Image.BICUBIC))
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        return pixels_to_tensor(patch)


def scaled_pixels(path: Path, scale: float = 1.0) -> np.ndarray:
    """An image's HxWx3 uint8 pixels at `scale`, resized as the teacher's downscaled tiles were."""
    image = open_image(path)
    if scale != 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    return np.asarray(image)


def decoder_scales(min_scale: float) -> list[float]:
    """`DECODER_SCALES` scales from `min_scale` to 1, geometrically."""
    n = DECODER_SCALES
    return [min_scale ** (k / (n - 1)) for k in range(n)] if min_scale < 1 else [1.0]


class StoredLatentCrops(torch.utils.data.Dataset):
    """Item i: a window of a photo's latent exactly as its latent file stores it, with a halo of the
    decoder kernel's reach (zeros beyond the image: the decoder's own padding), and the pixels of
    its interior.

    Each photo at each of `scales`, encoded once by `model`'s encoder at each of `levels` (default:
    each of its quality levels; a level listed twice is seen twice as often), or in its 8-bit
    min/max file for a model without levels: a decoder trained on these learns what the files it
    will read hold, and the encoder's codes keep their meaning.
    """

    def __init__(
        self,
        paths: list[Path],
        model: torch.nn.Module,
        crop: int,
        seed: int,
        scales: list[float],
        levels: Sequence[int] = (),
    ) -> None:
        from .codec import Codec
        from .models import Autoencoder

        self.crop, self.seed, self.factor = crop, seed, model.config.downscale
        self.halo = model.config.decoder_kernel // 2
        frozen = Autoencoder(model.config)
        frozen.load_state_dict(model.state_dict())
        codec = Codec(frozen, tile=None)
        if any(level > codec.quality_levels for level in levels):
            have = f"levels 1 to {codec.quality_levels}" if codec.quality_levels else "no quality levels"
            raise CodecError(f"--decoder-levels {','.join(map(str, levels))}: the model has {have}")
        qualities = list(levels) or list(range(1, codec.quality_levels + 1)) or [None]
        self.pairs: list[tuple[np.ndarray, torch.Tensor]] = []
        for path in paths:
            for scale in scales:
                pixels = scaled_pixels(path, scale)
                if min(pixels.shape[:2]) // self.factor * self.factor >= crop:
                    coded = {q: codec.encode(pixels, q).dequantize()[0] for q in dict.fromkeys(qualities)}
                    self.pairs += [(pixels, coded[q]) for q in qualities]  # a level listed twice is shown twice
        if not self.pairs:
            raise CodecError(f"no training image is at least --crop {crop} pixels on each side at every scale")

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        epoch, position = divmod(i, len(self.pairs))
        index = int(np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.pairs))[position])
        pixels, latent = self.pairs[index]
        f, side = self.factor, self.crop // self.factor
        top = int(rng.integers(0, pixels.shape[0] // f - side + 1))
        left = int(rng.integers(0, pixels.shape[1] // f - side + 1))
        h = self.halo
        halo = F.pad(latent, (h, h, h, h))[:, top : top + side + 2 * h, left : left + side + 2 * h]
        return halo, pixels_to_tensor(pixels[top * f : (top + side) * f, left * f : (left + side) * f])


class StepSampler(torch.utils.data.Sampler[int]):
    """Indices for steps start..stop of a run: this process's share of each global batch.

    Global batch s holds samples s*B*W .. (s+1)*B*W - 1 (B per process, W processes); process r
    takes its contiguous slice, like DistributedSampler, and a resumed run starts at its step.
    """

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start, self.stop, self.batch_size, self.rank, self.world = start, stop, batch_size, rank, world_size

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.stop):
            first = (step * self.world + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)
