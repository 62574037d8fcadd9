"""`hybrid-codec distill`: train the `sd` model, an encoder into the Stable Diffusion VAE latent space.

The latent loss is the teacher README's metric: per tile (or crop, with a live teacher) and channel,
the MSE over the variance of the target within that tile and channel, averaged. A global variance
would underweight flat tiles, which weigh as much as any in the metric.

Three stages (`--stage`): `both` trains the encoder on the latent loss and, beside it, the decoder on
the encoder's detached, fake-quantized latents; `encoder` the encoder alone (the decoder kept);
`decoder` the decoder alone on the frozen encoder's latents exactly as latent files store them
(encoded whole, 8-bit min/max per image and channel), of the training photos at scales from
`--decoder-min-scale` to 1, so that it also sees the level of detail of ordinary photos.

Targets come from a live `diffusers.AutoencoderKL` teacher (fed [-1, 1] images; the student always
takes [0, 1]) or from precomputed tiles `<image>_y<Y>_x<X>.npy` (see `find_tiles`). The schedule,
checkpoints, EMA and step sampling are the loop's (`training.fit`).
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .codec import Codec
from .data import RandomCrops, StoredLatentCrops, decoder_scales, scaled_pixels, usable_images
from .errors import CodecError
from .images import image_to_pixels, open_image, pixels_to_tensor
from .inputs import read_input
from .levels import export_levels, spread_steps
from .metrics import psnr
from .models import Autoencoder, CodecConfig
from .options import SD_STEP_RANGE, DistillOptions
from .quantize import dequantize, fake_quantize, quantize
from .training import Distributed, FitResult, Recipe, Reporter, decoder_levels, fit, initial_weights

TILE_NAME = re.compile(r"^(?P<image>.+)_y(?P<y>\d+)_x(?P<x>\d+)\.npy$")
SCALED_FOLDER = re.compile(r"-s(?P<digits>\d{2,})$")
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
    scale: float = 1.0  # of the image the tile is cut from (resized with Lanczos, as the teacher README says)


def folder_scale(folder: Path) -> float:
    """The image scale of a folder's tiles: `photos-s065` holds tiles of the photos at 0.65, others at 1."""
    match = SCALED_FOLDER.search(folder.name)
    return int(match["digits"]) / 10 ** (len(match["digits"]) - 1) if match else 1.0


def find_tiles(latent_dir: Path, images: list[Path], warn: Callable[[str], None] = print) -> list[Tile]:
    """The tiles in `latent_dir` and its subfolders that belong to `images` (matched by file stem), sorted.

    A folder named `<anything>-sNNN` holds tiles of the images at scale N.NN (`folder_scale`), so
    `--teacher-latents ../shared/teacher` takes both of its tile sets.
    """
    if not latent_dir.is_dir():
        raise CodecError(f"{latent_dir}: no such folder of teacher latents")
    by_stem: dict[str, Path] = {}
    for path in images:
        if path.stem in by_stem:
            raise CodecError(f"two images are named {path.stem!r} ({by_stem[path.stem]}, {path}): tiles are ambiguous")
        by_stem[path.stem] = path
    tiles, odd = [], 0
    for file in sorted(latent_dir.rglob("*.npy")):
        match = TILE_NAME.match(file.name)
        if not match:
            odd += 1
            continue
        if match["image"] in by_stem:
            scale = folder_scale(file.parent)
            tiles.append(Tile(by_stem[match["image"]], int(match["y"]), int(match["x"]), file, scale))
    if odd:
        warn(f"skipping {odd} .npy files in {latent_dir} not named <image>_y<Y>_x<X>.npy")
    return tiles


def _load_target(tile: Tile, image: np.ndarray, channels: int, factor: int) -> np.ndarray:
    try:
        latent = np.load(io.BytesIO(read_input(tile.latent, "teacher latent")), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
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
            f"{tile.image} at scale {tile.scale:g} ({image.shape[0]}x{image.shape[1]})"
        )
    return latent.astype(np.float32)


class TileCrops(torch.utils.data.Dataset):
    """Item i: a random 8-aligned crop of one tile, the matching crop of its latent, and the whole
    tile's target variance per channel (C,): the metric's weights, whatever the crop.

    A patch-local student can learn from any aligned crop of a (tile, latent) pair. Images and
    latents are read once and kept: a few hundred MB for the 49 shared photos.
    """

    def __init__(self, tiles: list[Tile], crop: int, seed: int, channels: int = 4, factor: int = 8) -> None:
        self.tiles, self.crop, self.seed, self.factor = tiles, crop, seed, factor
        images: dict[tuple[Path, float], np.ndarray] = {}
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []
        for tile in tiles:
            key = (tile.image, tile.scale)
            if key not in images:
                images[key] = scaled_pixels(tile.image, tile.scale)
            image = images[key]
            target = _load_target(tile, image, channels, factor)
            h, w = target.shape[1] * factor, target.shape[2] * factor
            if min(h, w) < crop:
                raise CodecError(f"{tile.latent}: its {h}x{w} tile is smaller than --crop {crop}")
            self.pairs.append((image[tile.top : tile.top + h, tile.left : tile.left + w], target))
        self.variances = [torch.from_numpy(t.reshape(t.shape[0], -1).var(1)) for _, t in self.pairs]

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, i])
        epoch, position = divmod(i, len(self.pairs))
        index = int(np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.pairs))[position])
        pixels, target = self.pairs[index]
        f, side = self.factor, self.crop // self.factor
        top = int(rng.integers(0, target.shape[1] - side + 1))
        left = int(rng.integers(0, target.shape[2] - side + 1))
        patch = pixels[top * f : (top + side) * f, left * f : (left + side) * f]
        window = np.ascontiguousarray(target[:, top : top + side, left : left + side])
        return pixels_to_tensor(patch), torch.from_numpy(window), self.variances[index]

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


# ---------------------------------------------------------------- the metric, validation and training


def relative_errors(latents: torch.Tensor, targets: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C): per tile and channel, MSE(latent, target) / the target's variance within that tile and
    channel (the teacher README's metric; `variance` (B, C) if the targets are crops of bigger tiles)."""
    if variance is None:
        variance = targets.var((2, 3), unbiased=False)
    return (latents - targets).pow(2).mean((2, 3)) / variance.clamp_min(1e-12)


@torch.no_grad()
def evaluate(model: Autoencoder, pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> dict:
    """Latent relative error (tile by tile, `relative_errors`; per channel and their mean) and round-trip PSNR.

    The student's own round trip goes through real 8-bit latents, as a latent file would.
    """
    was_training = model.training
    model.eval()
    errors, scores = [], []
    for image, target in pairs:
        image, target = image[None].to(device), target[None].to(device, torch.float32)
        latent = model.encoder(image)
        errors.append(relative_errors(latent.double(), target.double())[0].cpu())
        window = _central_crop(latent, VAL_SIDE // model.config.downscale, 1)
        decoded = model.decoder(dequantize(*quantize(window)))
        scores.append(psnr(_central_crop(image, VAL_SIDE, model.config.downscale), decoded))
    model.train(was_training)
    per_channel = torch.stack(errors).mean(0)
    channels = {f"val_latent_rel_{c}": e.item() for c, e in enumerate(per_channel)}
    return {"val_latent_rel": per_channel.mean().item(), **channels, "val_psnr": sum(scores) / len(scores)}


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
        self.train_paths: list[Path] = []

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
        self.train_paths, val_paths = _split(opts, log)
        if opts.teacher_latents is None:
            from .sd import DEFAULT_VAE, load_vae

            self.teacher = load_vae("sd", opts.teacher or DEFAULT_VAE["sd"], device, flag="--teacher")
            for path in val_paths:
                image = _central_crop(pixels_to_tensor(np.asarray(open_image(path))), VAL_SIDE, factor)
                self.val_pairs.append((image, teacher_latents(self.teacher, image[None].to(device))[0].cpu()))
            if opts.stage == "decoder":
                return self.stored_latents()
            return RandomCrops(self.train_paths, opts.crop, opts.seed, min_scale=0.5)
        tiles = find_tiles(opts.teacher_latents, self.train_paths, warn=log)
        if not tiles:
            folder = opts.teacher_latents
            raise CodecError(f"{folder}: no <image>_y<Y>_x<X>.npy tiles for the images in {opts.data_dir}")
        crops = TileCrops(tiles, opts.crop, opts.seed, opts.model.latent_channels, factor)
        val_tiles = find_tiles(opts.teacher_latents, val_paths, warn=lambda m: None) if val_paths else []
        self.val_pairs = TileCrops(val_tiles, factor, opts.seed, opts.model.latent_channels, factor).whole()
        if val_paths and not self.val_pairs:
            log(f"no teacher tiles for the {len(val_paths)} validation images: validation is off")
        return self.stored_latents() if opts.stage == "decoder" else crops

    def stored_latents(self) -> StoredLatentCrops:
        """The decoder stage's data: what the --init-from encoder's files hold, at every scale."""
        encoder = initial_weights(self.opts.init_from, self.opts.model)
        scales = decoder_scales(self.opts.decoder_min_scale)
        levels = decoder_levels(self.opts)
        return StoredLatentCrops(self.train_paths, encoder, self.opts.crop, self.opts.seed, scales, levels)

    def model(self, config: CodecConfig) -> Autoencoder:
        if self.opts.stage != "decoder":
            return super().model(config)
        model = Autoencoder(config)  # its latents come from this encoder and its levels: they must not move
        model.load_state_dict(initial_weights(self.opts.init_from, config).state_dict())
        model.encoder.requires_grad_(False)
        return model

    def final(self, model: Autoencoder, config: CodecConfig) -> Autoencoder:
        """The trained weights; after an encoder stage, quality levels for its latents: steps that are
        fixed fractions of each channel's spread (`SD_STEP_RANGE`), tables from the training photos' codes."""
        final = super().final(model, config)
        if self.opts.stage != "decoder" and final.levels is not None:
            final.eval()
            codec = Codec(final, device=self.device)
            latents = [codec.encode_tensor(image_to_pixels(open_image(p)))[0].cpu() for p in self.train_paths]
            fractions = np.geomspace(*SD_STEP_RANGE, final.levels.count)
            steps, offset = spread_steps(latents, fractions)
            final.levels.offset.copy_(offset)
            export_levels(final.levels, steps, latents)
        return final

    def clip_groups(self, model: Autoencoder) -> list[torch.nn.Module]:
        return [model.encoder, model.decoder]  # their two losses differ in scale

    def loss(self, net: Autoencoder, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        opts, factor = self.opts, self.opts.model.downscale
        if opts.stage == "decoder":
            halo, images = batch[0].to(self.device), batch[1].to(self.device)
            edge = factor * (opts.model.decoder_kernel // 2)
            decoded = net.decoder(halo, clamp=False)[..., edge:-edge, edge:-edge]
            return F.mse_loss(decoded, images), {"psnr": psnr(images, decoded.detach())}
        variance = None
        if self.teacher is not None:
            images = batch.to(self.device)
            targets = teacher_latents(self.teacher, images)
        else:
            images, targets, variance = (part.to(self.device) for part in batch)
        latents = net.encoder(images)
        if targets.shape != latents.shape:
            raise CodecError(
                f"the teacher gives latents {tuple(targets.shape[1:])} for {tuple(images.shape[1:])} crops, the "
                f"student {tuple(latents.shape[1:])}: the teacher is not an SD VAE (4 channels, 1/8 size)"
            )
        latent_loss = relative_errors(latents, targets, variance).mean()
        metrics = {"latent_rel": latent_loss.item()}
        if opts.stage == "encoder":
            return latent_loss, metrics
        side = (opts.decoder_crop or opts.crop) // factor
        if side < latents.shape[-1]:  # a window of the crop: the decoder is the slow half
            rng = np.random.default_rng([opts.seed, step, 2])
            top, left = (int(rng.integers(0, n - side + 1)) for n in latents.shape[-2:])
            latents = latents[..., top : top + side, left : left + side]
            images = images[..., top * factor : (top + side) * factor, left * factor : (left + side) * factor]
        decoded = net.decoder(fake_quantize(latents.detach()), clamp=False)
        loss = latent_loss + opts.image_weight * F.mse_loss(decoded, images)
        return loss, {**metrics, "psnr": psnr(images, decoded.detach())}

    def validate(self, model: Autoencoder) -> dict[str, float]:
        return evaluate(model, self.val_pairs, self.device) if self.val_pairs else {}


def distill(opts: DistillOptions, report: Reporter | None = None, log: Callable[[str], None] = print) -> FitResult:
    """Train the SD-space student; writes --out (the EMA weights) at every validation and at the end."""
    if opts.stage == "decoder" and opts.init_from is not None:  # the decoder learns --init-from's levels
        levels = initial_weights(opts.init_from, opts.model).config.quality_levels
        opts = dataclasses.replace(opts, model=dataclasses.replace(opts.model, quality_levels=levels))
    return fit(Distillation(opts), opts, report, log)


def relative_error_report(val: dict[str, float]) -> str:
    if not val:
        return "no validation"
    channels = ", ".join(f"{val[f'val_latent_rel_{c}']:.3f}" for c in range(4) if f"val_latent_rel_{c}" in val)
    return (
        f"validation latent rel. error {val['val_latent_rel']:.4f} (per channel {channels}), "
        f"round-trip PSNR {val['val_psnr']:.2f} dB"
    )
