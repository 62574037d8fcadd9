"""`hybrid-codec distill`: train the `sd` model, an encoder into the Stable Diffusion VAE latent space.

The student encoder learns the teacher's latent mean (raw, unscaled SD space) on random 8-aligned
crops; the student decoder learns to decode the student's own (detached, 8-bit fake-quantized)
latents, so it decodes exactly what latent files will hold. The latent loss is the MSE per channel
divided by the targets' variance per channel: a relative error, with every channel weighing the same.

Targets come from a live `diffusers.AutoencoderKL` teacher (fed [-1, 1] images; the student always
takes [0, 1]) or from precomputed tiles `<image>_y<Y>_x<X>.npy` (see `TileCrops`). The schedule,
checkpoints, EMA and step sampling are the ones of `training.py`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .codec import pick_device
from .data import RandomCrops, StepSampler, usable_images
from .errors import CodecError
from .images import open_image
from .metrics import psnr
from .models import Autoencoder, CodecConfig
from .options import DistillOptions
from .quantize import dequantize, fake_quantize, quantize
from .training import Optimization, Reporter, load_checkpoint, save_checkpoint

TILE_NAME = re.compile(r"^(?P<image>.+)_y(?P<y>\d+)_x(?P<x>\d+)\.npy$")
CHECKPOINT_FORMAT = "hybrid-codec-distill-checkpoint"
VAL_SIDE = 256
"""Validation looks at the central (at most) VAL_SIDE x VAL_SIDE crop of each image or tile: the
SD VAE (live teacher) and the decoder are the slow parts; the latent error uses whole tiles."""


@dataclass
class DistillResult:
    out: Path
    steps: int
    seconds: float
    finished: bool  # False when --max-minutes stopped it early: --resume continues
    val: dict[str, float]


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
        image = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1).float().div_(255.0)
        return image, torch.from_numpy(np.ascontiguousarray(target[:, top : top + side, left : left + side]))

    def whole(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every (tile image, tile latent) pair whole: the validation set."""
        return [
            (torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1).float().div_(255.0), torch.from_numpy(t))
            for p, t in self.pairs
        ]


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


def distill(opts: DistillOptions, report: Reporter | None = None, log: Callable[[str], None] = print) -> DistillResult:
    """Train the SD-space student; writes --out (the EMA weights) at every validation and at the end."""
    factor = opts.model.downscale
    if opts.crop % factor or opts.crop < factor:
        raise CodecError(f"--crop must be a positive multiple of {factor}")
    decoder_side = (opts.decoder_crop or opts.crop) // factor
    if opts.decoder_crop % factor or decoder_side * factor > opts.crop or decoder_side < 1:
        raise CodecError(f"--decoder-crop must be a multiple of {factor} no larger than --crop")
    if opts.steps < 1 or opts.batch_size < 1:
        raise CodecError("--steps and --batch-size must be positive")
    if opts.model.latent_space != "sd":
        raise CodecError("distill trains SD-space models: the config's latent_space must be 'sd'")
    device = pick_device(opts.device)
    train_paths, val_paths = _split(opts, log)

    teacher = None
    if opts.teacher_latents is not None:
        if opts.teacher is not None:
            raise CodecError("give --teacher or --teacher-latents, not both")
        tiles = find_tiles(opts.teacher_latents, train_paths, warn=log)
        if not tiles:
            raise CodecError(
                f"{opts.teacher_latents}: no <image>_y<Y>_x<X>.npy tiles for the images in {opts.data_dir}"
            )
        crops = TileCrops(tiles, opts.crop, opts.seed, opts.model.latent_channels, factor)
        val_tiles = find_tiles(opts.teacher_latents, val_paths, warn=lambda m: None) if val_paths else []
        val_pairs = TileCrops(val_tiles, factor, opts.seed, opts.model.latent_channels, factor).whole()
        if val_paths and not val_pairs:
            log(f"no teacher tiles for the {len(val_paths)} validation images: validation is off")
        variance = torch.from_numpy(np.concatenate([t.reshape(t.shape[0], -1) for _, t in crops.pairs], 1).var(1))
    else:
        from .sd import DEFAULT_VAE, load_vae

        teacher = load_vae("sd", opts.teacher or DEFAULT_VAE["sd"], device)
        crops = RandomCrops(train_paths, opts.crop, opts.seed, min_scale=0.5)
        val_pairs = []
        for path in val_paths:
            image = _central_crop(torch.from_numpy(np.array(open_image(path))).permute(2, 0, 1) / 255.0, VAL_SIDE, 8)
            val_pairs.append((image, teacher_latents(teacher, image[None].to(device))[0].cpu()))
        variance = None  # estimated from the first batch, then kept in the checkpoint

    torch.manual_seed(opts.seed)
    model = Autoencoder(opts.model).to(device)
    run = Optimization(
        model, opts.lr, opts.warmup, opts.steps, opts.ema, opts.clip, clip_groups=[model.encoder, model.decoder]
    )
    start, elapsed, val = 0, 0.0, {}
    if opts.resume:
        state = load_checkpoint(opts.resume)
        if state.get("format") != CHECKPOINT_FORMAT or CodecConfig.from_json(state["config"]) != opts.model:
            raise CodecError(f"{opts.resume}: not a distill checkpoint of this model configuration")
        run.restore(state)
        start, elapsed, val = state["step"], state["seconds"], state.get("val", {})
        variance = state["variance"] if variance is None else variance
        if start >= opts.steps:
            raise CodecError(f"{opts.resume} is already at step {start} of {opts.steps}: raise --steps to go on")
        log(f"resumed from {opts.resume} at step {start}")

    loader = torch.utils.data.DataLoader(
        crops, batch_size=opts.batch_size, sampler=StepSampler(start, opts.steps, opts.batch_size), num_workers=0
    )

    def export() -> None:
        final = Autoencoder(opts.model)
        final.load_state_dict(run.current().state_dict())
        final.save_pretrained(opts.out)

    def checkpoint(step: int) -> None:
        seconds = elapsed + time.monotonic() - began
        state = run.state(CHECKPOINT_FORMAT, opts, step, seconds)
        save_checkpoint(opts.checkpoint, {**state, "val": val, "variance": variance})

    began = time.monotonic()
    step, finished = start, True
    model.train()
    for step, batch in enumerate(loader, start=start + 1):
        if teacher is not None:
            images = batch.to(device)
            targets = teacher_latents(teacher, images)
        else:
            images, targets = batch[0].to(device), batch[1].to(device)
        latents = model.encoder(images)
        if targets.shape != latents.shape:
            raise CodecError(
                f"the teacher gives latents {tuple(targets.shape[1:])} for {tuple(images.shape[1:])} crops, the "
                f"student {tuple(latents.shape[1:])}: the teacher is not an SD VAE (4 channels, 1/8 size)"
            )
        if variance is None:
            variance = targets.float().var((0, 2, 3)).clamp_min(1e-6).cpu()
        latent_loss = latent_relative_error(latents, targets, variance.to(device))
        if decoder_side < latents.shape[-1]:  # a window of the crop: the decoder is the slow half
            rng = np.random.default_rng([opts.seed, step, 2])
            top, left = (int(rng.integers(0, n - decoder_side + 1)) for n in latents.shape[-2:])
            window = latents[..., top : top + decoder_side, left : left + decoder_side]
            images = images[
                ..., top * factor : (top + decoder_side) * factor, left * factor : (left + decoder_side) * factor
            ]
        else:
            window = latents
        decoded = model.decoder(fake_quantize(window.detach()), clamp=False)
        image_loss = F.mse_loss(decoded, images)
        loss = latent_loss + opts.image_weight * image_loss
        if not torch.isfinite(loss):
            raise CodecError(f"distillation diverged at step {step} (loss {loss.item()}); lower --lr")
        run.step(loss)
        metrics = {
            "latent_rel": latent_loss.item(),
            "psnr": psnr(images, decoded.detach()),
            "lr": run.lr(),
        }
        out_of_time = opts.max_minutes > 0 and (time.monotonic() - began) / 60 >= opts.max_minutes
        last = step == opts.steps or out_of_time
        if val_pairs and (step % opts.val_every == 0 or last):
            val = evaluate(run.current(), val_pairs, device)
            metrics.update(val)
            export()
        if step % opts.checkpoint_every == 0 or last:
            checkpoint(step)
        if report:
            report(step, opts.steps, metrics)
        if out_of_time and step < opts.steps:
            log(f"--max-minutes {opts.max_minutes:g} reached at step {step}; --resume {opts.checkpoint} goes on")
            finished = False
            break
    if not val_pairs:
        export()
    seconds = elapsed + time.monotonic() - began
    return DistillResult(opts.out, step, seconds, finished, {k: float(v) for k, v in val.items()})


def relative_error_report(val: dict[str, float]) -> str:
    if not val:
        return "no validation"
    return f"validation latent rel. error {val['val_latent_rel']:.4f}, round-trip PSNR {val['val_psnr']:.2f} dB"
