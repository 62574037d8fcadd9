"""`hybrid-codec distill`: train the `sd` model, an encoder into the Stable Diffusion VAE latent space.

The student encoder learns the teacher's latent mean (raw, unscaled SD space) on random 8-aligned
crops; the student decoder learns to decode the student's own (detached, 8-bit fake-quantized)
latents, so it decodes exactly what latent files will hold. The latent loss is the MSE per channel
divided by the targets' variance per channel: a relative error, with every channel weighing the same.

Targets come from a live `diffusers.AutoencoderKL` teacher (fed [-1, 1] images; the student always
takes [0, 1]) or from precomputed tiles `<image>_y<Y>_x<X>.npy` (see `TileCrops`). The schedule,
checkpoints, EMA and step sampling are the loop's (`training.fit`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import RandomCrops, usable_images
from .errors import CodecError
from .images import open_image, pixels_to_tensor
from .metrics import psnr
from .models import Autoencoder
from .options import DistillOptions
from .quantize import dequantize, fake_quantize, quantize
from .training import Distributed, FitResult, Recipe, Reporter, fit

TILE_NAME = re.compile(r"^(?P<image>.+)_y(?P<y>\d+)_x(?P<x>\d+)\.npy$")
VAL_SIDE = 256
"""Validation looks at the central (at most) VAL_SIDE x VAL_SIDE crop of each image or tile: the
SD VAE (live teacher) and the decoder are the slow parts; the latent error uses whole tiles."""


# ---------------------------------------------------------------- precomputed targets


@dataclass(frozen=True)
class Tile:
    image: Path
    top: int
    left: int
    latent: Path


def find_tiles(latent_dir: Path, images: list[Path], warn: Callable[[str], None] = print) -> list[Tile]:
    """The tiles in `latent_dir` that belong to `images` (matched by file stem), sorted."""
    if not latent_dir.is_dir():
        raise CodecError(f"{latent_dir}: no such folder of teacher latents")
    by_stem: dict[str, Path] = {}
    for path in images:
        if path.stem in by_stem:
            raise CodecError(f"two images are named {path.stem!r} ({by_stem[path.stem]}, {path}): tiles are ambiguous")
        by_stem[path.stem] = path
    tiles, odd = [], 0
    for file in sorted(latent_dir.glob("*.npy")):
        match = TILE_NAME.match(file.name)
        if not match:
            odd += 1
            continue
        if match["image"] in by_stem:
            tiles.append(Tile(by_stem[match["image"]], int(match["y"]), int(match["x"]), file))
    if odd:
        warn(f"skipping {odd} .npy files in {latent_dir} not named <image>_y<Y>_x<X>.npy")
    return tiles


def _load_target(tile: Tile, image: np.ndarray, channels: int, factor: int) -> np.ndarray:
    try:
        latent = np.load(tile.latent, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CodecError(f"{tile.latent}: not a readable .npy array ({exc})") from None
    if latent.ndim != 3 or latent.shape[0] != channels or not np.issubdtype(latent.dtype, np.floating):
        raise CodecError(f"{tile.latent}: expected a float array ({channels}, h, w), got {latent.dtype} {latent.shape}")
    if not np.isfinite(latent).all():
        raise CodecError(f"{tile.latent}: holds NaN or infinite values")
    h, w = latent.shape[1] * factor, latent.shape[2] * factor
    if tile.top % factor or tile.left % factor:
        raise CodecError(f"{tile.latent}: tile corner ({tile.top}, {tile.left}) is not a multiple of {factor}")
    if tile.top + h > image.shape[0] or tile.left + w > image.shape[1]:
        raise CodecError(
            f"{tile.latent}: a {h}x{w} tile at ({tile.top}, {tile.left}) does not fit in "
            f"{tile.image} ({image.shape[0]}x{image.shape[1]})"
        )
    return latent.astype(np.float32)


class TileCrops(torch.utils.data.Dataset):
    """Item i: a random 8-aligned crop of one tile and the matching crop of its latent, like RandomCrops.

    A patch-local student can learn from any aligned crop of a (tile, latent) pair. Images and
    latents are read once and kept: a few hundred MB for the 49 shared photos.
    """

    def __init__(self, tiles: list[Tile], crop: int, seed: int, channels: int = 4, factor: int = 8) -> None:
        self.tiles, self.crop, self.seed, self.factor = tiles, crop, seed, factor
        images: dict[Path, np.ndarray] = {}
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []
        for tile in tiles:
            if tile.image not in images:
                images[tile.image] = np.asarray(open_image(tile.image))
            image = images[tile.image]
            target = _load_target(tile, image, channels, factor)
            h, w = target.shape[1] * factor, target.shape[2] * factor
            if min(h, w) < crop:
                raise CodecError(f"{tile.latent}: its {h}x{w} tile is smaller than --crop {crop}")
            self.pairs.append((image[tile.top : tile.top + h, tile.left : tile.left + w], target))

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        epoch, position = divmod(i, len(self.pairs))
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.pairs))
        pixels, target = self.pairs[int(order[position])]
        f, side = self.factor, self.crop // self.factor
        top = int(rng.integers(0, target.shape[1] - side + 1))
        left = int(rng.integers(0, target.shape[2] - side + 1))
        patch = pixels[top * f : (top + side) * f, left * f : (left + side) * f]
        window = np.ascontiguousarray(target[:, top : top + side, left : left + side])
        return pixels_to_tensor(patch), torch.from_numpy(window)

    def whole(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every (tile image, tile latent) pair whole: the validation set."""
        return [(pixels_to_tensor(p), torch.from_numpy(t)) for p, t in self.pairs]


# ---------------------------------------------------------------- live teacher


@torch.no_grad()
def teacher_latents(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Raw SD latent mean of images in [0, 1] (the SD VAE takes [-1, 1])."""
    dtype = next(teacher.parameters()).dtype
    return teacher.encode(images.to(dtype) * 2 - 1).latent_dist.mean.float()


def _central_crop(image: torch.Tensor, side: int, factor: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    ch, cw = min(side, h - h % factor), min(side, w - w % factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[..., top : top + ch, left : left + cw]


# ---------------------------------------------------------------- validation and training


@torch.no_grad()
def evaluate(model: Autoencoder, pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> dict:
    """Latent relative error (per channel MSE / target variance, averaged over channels) and round-trip PSNR.

    The student's own round trip goes through real 8-bit latents, as a latent file would.
    """
    was_training = model.training
    model.eval()
    channels = model.config.latent_channels
    sq_err, total, total_sq, count = (torch.zeros(channels, dtype=torch.float64) for _ in range(4))
    scores = []
    for image, target in pairs:
        image, target = image[None].to(device), target[None].to(device, torch.float32)
        latent = model.encoder(image)
        sq_err += (latent - target).double().pow(2).sum((0, 2, 3)).cpu()
        total += target.double().sum((0, 2, 3)).cpu()
        total_sq += target.double().pow(2).sum((0, 2, 3)).cpu()
        count += target[0, 0].numel()
        window = _central_crop(latent, VAL_SIDE // model.config.downscale, 1)
        decoded = model.decoder(dequantize(*quantize(window)))
        scores.append(psnr(_central_crop(image, VAL_SIDE, model.config.downscale), decoded))
    model.train(was_training)
    variance = (total_sq / count - (total / count) ** 2).clamp_min(1e-12)
    relative = sq_err / count / variance
    return {"val_latent_rel": relative.mean().item(), "val_psnr": sum(scores) / len(scores)}


def latent_relative_error(latents: torch.Tensor, targets: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Mean over channels of MSE_c / variance_c: each channel weighs the same, whatever its scale."""
    return ((latents - targets).pow(2).mean((0, 2, 3)) / variance).mean()


def _split(opts: DistillOptions, log: Callable[[str], None]) -> tuple[list[Path], list[Path]]:
    paths = usable_images(opts.data_dir, warn=log)
    val = usable_images(opts.val_dir, warn=log) if opts.val_dir else []
    if opts.holdout:
        if opts.holdout >= len(paths):
            raise CodecError(f"--holdout {opts.holdout} would leave no training images (of {len(paths)})")
        paths, val = paths[: -opts.holdout], val + paths[-opts.holdout :]
    return paths, val


class Distillation(Recipe):
    """The SD recipe: the encoder learns the teacher's latents, the decoder decodes the student's own."""

    checkpoint_format = "hybrid-codec-distill-checkpoint"

    def __init__(self, opts: DistillOptions) -> None:
        self.opts = opts
        self.teacher: torch.nn.Module | None = None
        self.val_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.variance: torch.Tensor | None = None  # per latent channel, of the targets

    def check(self) -> None:
        opts, factor = self.opts, self.opts.model.downscale
        decoder_side = (opts.decoder_crop or opts.crop) // factor
        if opts.decoder_crop % factor or decoder_side * factor > opts.crop or decoder_side < 1:
            raise CodecError(f"--decoder-crop must be a multiple of {factor} no larger than --crop")
        if opts.model.latent_space != "sd":
            raise CodecError("distill trains SD-space models: the config's latent_space must be 'sd'")
        if opts.teacher is not None and opts.teacher_latents is not None:
            raise CodecError("give --teacher or --teacher-latents, not both")
        if Distributed().world > 1:  # the loss calls the encoder and decoder apart, which DDP does not see
            raise CodecError("distill runs in one process: start it without torchrun")

    def setup(self, device: torch.device, log: Callable[[str], None]) -> torch.utils.data.Dataset:
        opts, factor, self.device = self.opts, self.opts.model.downscale, device
        train_paths, val_paths = _split(opts, log)
        if opts.teacher_latents is None:
            from .sd import DEFAULT_VAE, load_vae

            self.teacher = load_vae("sd", opts.teacher or DEFAULT_VAE["sd"], device, flag="--teacher")
            for path in val_paths:
                image = _central_crop(pixels_to_tensor(np.asarray(open_image(path))), VAL_SIDE, factor)
                self.val_pairs.append((image, teacher_latents(self.teacher, image[None].to(device))[0].cpu()))
            return RandomCrops(train_paths, opts.crop, opts.seed, min_scale=0.5)
        tiles = find_tiles(opts.teacher_latents, train_paths, warn=log)
        if not tiles:
            folder = opts.teacher_latents
            raise CodecError(f"{folder}: no <image>_y<Y>_x<X>.npy tiles for the images in {opts.data_dir}")
        crops = TileCrops(tiles, opts.crop, opts.seed, opts.model.latent_channels, factor)
        val_tiles = find_tiles(opts.teacher_latents, val_paths, warn=lambda m: None) if val_paths else []
        self.val_pairs = TileCrops(val_tiles, factor, opts.seed, opts.model.latent_channels, factor).whole()
        if val_paths and not self.val_pairs:
            log(f"no teacher tiles for the {len(val_paths)} validation images: validation is off")
        self.variance = torch.from_numpy(np.concatenate([t.reshape(t.shape[0], -1) for _, t in crops.pairs], 1).var(1))
        return crops

    def clip_groups(self, model: Autoencoder) -> list[torch.nn.Module]:
        return [model.encoder, model.decoder]  # their two losses differ in scale

    def loss(self, net: Autoencoder, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        opts, factor = self.opts, self.opts.model.downscale
        if self.teacher is not None:
            images = batch.to(self.device)
            targets = teacher_latents(self.teacher, images)
        else:
            images, targets = batch[0].to(self.device), batch[1].to(self.device)
        latents = net.encoder(images)
        if targets.shape != latents.shape:
            raise CodecError(
                f"the teacher gives latents {tuple(targets.shape[1:])} for {tuple(images.shape[1:])} crops, the "
                f"student {tuple(latents.shape[1:])}: the teacher is not an SD VAE (4 channels, 1/8 size)"
            )
        if self.variance is None:  # a live teacher: estimated from the first batch, then kept in the checkpoint
            self.variance = targets.float().var((0, 2, 3)).clamp_min(1e-6).cpu()
        latent_loss = latent_relative_error(latents, targets, self.variance.to(self.device))
        side = (opts.decoder_crop or opts.crop) // factor
        if side < latents.shape[-1]:  # a window of the crop: the decoder is the slow half
            rng = np.random.default_rng([opts.seed, step, 2])
            top, left = (int(rng.integers(0, n - side + 1)) for n in latents.shape[-2:])
            latents = latents[..., top : top + side, left : left + side]
            images = images[..., top * factor : (top + side) * factor, left * factor : (left + side) * factor]
        decoded = net.decoder(fake_quantize(latents.detach()), clamp=False)
        loss = latent_loss + opts.image_weight * F.mse_loss(decoded, images)
        return loss, {"latent_rel": latent_loss.item(), "psnr": psnr(images, decoded.detach())}

    def validate(self, model: Autoencoder) -> dict[str, float]:
        return evaluate(model, self.val_pairs, self.device) if self.val_pairs else {}

    def state(self) -> dict:
        return {"variance": self.variance}

    def restore(self, state: dict) -> None:
        if self.variance is None:
            self.variance = state["variance"]


def distill(opts: DistillOptions, report: Reporter | None = None, log: Callable[[str], None] = print) -> FitResult:
    """Train the SD-space student; writes --out (the EMA weights) at every validation and at the end."""
    return fit(Distillation(opts), opts, report, log)


def relative_error_report(val: dict[str, float]) -> str:
    if not val:
        return "no validation"
    return f"validation latent rel. error {val['val_latent_rel']:.4f}, round-trip PSNR {val['val_psnr']:.2f} dB"
