"""Training the codec: `hybrid-codec train`, or `torchrun --nproc_per_node N -m hybrid_codec train ...`.

The recipe: random multi-scale crops, quantization-aware training (the decoder always sees
8-bit latents, with a straight-through gradient), one of four reconstruction losses, and
validation on a folder with the best weights kept. The schedule, clipping, EMA, checkpoints,
resume and DDP are the loop's (`training.fit`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .codec import Codec
from .data import RandomCrops, StoredLatentCrops, decoder_scales, usable_images
from .errors import CodecError
from .images import image_to_pixels, image_to_tensor, open_image
from .levels import RateProxy, export_levels
from .metrics import ms_ssim_loss_value, psnr
from .models import Autoencoder, CodecConfig
from .options import TrainOptions
from .training import Distributed, FitResult, Recipe, Reporter, decoder_levels, fit, initial_weights
from .zoo import resolve_weights

LOSSES = ("mse", "psnr", "ms-ssim", "mix")


class TrainResult(FitResult):
    """`fit`'s result, under the photo recipe's names."""

    @property
    def best_val_psnr(self) -> float | None:
        return self.best

    @property
    def last_loss(self) -> float:
        return self.metrics.get("loss", math.nan)


def reconstruction_loss(kind: str, image: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """The training loss of a batch (B, 3, H, W); "psnr" is minus the mean per-image PSNR.

    MSE weighs a crop by its error, so busy textures dominate; mean PSNR, the validation
    metric, counts every image's decibels alike, smooth ones too.
    """
    if kind == "mse":
        return F.mse_loss(decoded, image)
    if kind == "psnr":
        per_image = (decoded - image).pow(2).flatten(1).mean(1)
        return 10 * torch.log10(per_image + 1e-10).mean()
    similarity = 1 - ms_ssim_loss_value(decoded.clamp(0, 1).float(), image.float())
    if kind == "ms-ssim":
        return similarity
    return 0.84 * similarity + 0.16 * F.l1_loss(decoded, image)


def validate(model: Autoencoder, paths: list[Path], device: torch.device) -> float:
    """Mean PSNR over whole validation images through real latent files: at every quality level, or 8-bit."""
    codec = Codec(model, device=device)
    qualities = list(range(1, codec.quality_levels + 1)) or [None]
    scores = []
    for path in paths:
        image = open_image(path)
        reference = image_to_tensor(image)
        scores += [psnr(reference, image_to_tensor(codec.decode(codec.encode(image, q)))) for q in qualities]
    return sum(scores) / len(scores)


class Photos(Recipe):
    """The photo recipe: encoder and decoder together, reconstructing random multi-scale crops."""

    checkpoint_format = "hybrid-codec-checkpoint"
    best_by = "val_psnr"

    def __init__(self, opts: TrainOptions) -> None:
        self.opts = opts
        self.val_paths: list[Path] = []

    def check(self) -> None:
        if self.opts.loss not in LOSSES:
            raise CodecError(f"unknown loss {self.opts.loss!r}; expected one of {LOSSES}")
        if self.opts.val_limit < 0:
            raise CodecError(f"--val-limit must not be negative, not {self.opts.val_limit}")
        if not 0 < self.opts.min_scale <= 1:
            raise CodecError(f"--min-scale must be in (0, 1], not {self.opts.min_scale}")

    def setup(self, device: torch.device, log: Callable[[str], None]) -> RandomCrops:
        opts, self.device = self.opts, device
        paths = usable_images(opts.data_dir, warn=log)
        self.val_paths = usable_images(opts.val_dir, warn=log) if opts.val_dir else []
        if opts.val_limit:
            self.val_paths = self.val_paths[: opts.val_limit]
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        return RandomCrops(paths, opts.crop, opts.seed, opts.min_scale)

    def model(self, config: CodecConfig) -> Autoencoder:
        model = super().model(config)
        if self.opts.stage == "encoder":
            model.decoder.requires_grad_(False)
        return model

    def loss(self, net: torch.nn.Module, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch.to(self.device, non_blocking=True)
        with self.amp:
            decoded = net(images)
            loss = reconstruction_loss(self.opts.loss, images, decoded.float())
        return loss, {"loss": loss.item(), "psnr": psnr(images, decoded.detach().float())}

    def validate(self, model: Autoencoder) -> dict[str, float]:
        return {"val_psnr": validate(model, self.val_paths, self.device)} if self.val_paths else {}


class DecoderStage(Photos):
    """--stage decoder: the decoder alone, on --init-from's latents exactly as its files store them.

    Crops of the training photos at several scales, coded at every quality level (or in 8-bit
    files). The encoder, the levels' steps and their tables stay as --init-from has them, so every
    image keeps its codes and the tables still fit them: only what the codes decode to improves.
    """

    checkpoint_format = "hybrid-codec-decoder-checkpoint"

    def check(self) -> None:
        super().check()
        if Distributed().world > 1:  # the loss calls the decoder alone, which DDP does not see
            raise CodecError("--stage decoder runs in one process: start it without torchrun")

    def setup(self, device: torch.device, log: Callable[[str], None]) -> StoredLatentCrops:
        crops = super().setup(device, log)
        source = initial_weights(self.opts.init_from, self.opts.model)
        scales = decoder_scales(self.opts.decoder_min_scale)
        levels = decoder_levels(self.opts)
        return StoredLatentCrops(crops.paths, source, self.opts.crop, self.opts.seed, scales, levels)

    def model(self, config: CodecConfig) -> Autoencoder:
        model = Autoencoder(config)
        model.load_state_dict(initial_weights(self.opts.init_from, config).state_dict())  # the levels too
        model.encoder.requires_grad_(False)
        return model

    def loss(self, net: Autoencoder, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        halo, images = (part.to(self.device, non_blocking=True) for part in batch)
        edge = self.opts.model.downscale * (self.opts.model.decoder_kernel // 2)
        with self.amp:
            decoded = net.decoder(halo, clamp=False)[..., edge:-edge, edge:-edge]
            loss = reconstruction_loss(self.opts.loss, images, decoded.float())
        return loss, {"loss": loss.item(), "psnr": psnr(images, decoded.detach().float())}


def parse_lambdas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise CodecError(f"--lambdas must be comma-separated numbers, not {text!r}") from None
    if not all(v > 0 and math.isfinite(v) for v in values) or values != sorted(values) or len(values) > 255:
        raise CodecError(f"--lambdas must be positive and increasing (smallest file first), at most 255: {text!r}")
    return values


class RateDistortion(Photos):
    """Quality levels: fine-tune encoder and decoder with `lambda[level] * MSE + bits per pixel` per crop.

    Each step shows every level (crop i of step s at level (i + s) mod levels), so one decoder learns
    them all; the steps and the rate model (`levels.RateProxy`) train with the weights. Each crop's
    loss is divided by sqrt(lambda), so neither the coarsest nor the finest level drowns the others.
    --out gets the learned steps and integer tables counted from the training images' real codes.
    There is no validation: which weights are best depends on the level.
    """

    checkpoint_format = "hybrid-codec-levels-checkpoint"
    best_by = None

    def __init__(self, opts: TrainOptions) -> None:
        super().__init__(opts)
        self.lambdas = torch.tensor(parse_lambdas(opts.lambdas))

    def check(self) -> None:
        super().check()
        if self.opts.model.quality_levels != len(self.lambdas):
            raise CodecError(
                f"--lambdas gives {len(self.lambdas)} levels; the model has {self.opts.model.quality_levels}"
            )

    def setup(self, device: torch.device, log: Callable[[str], None]) -> RandomCrops:
        crops = super().setup(device, log)
        self.paths, self.lambdas = crops.paths, self.lambdas.to(device)
        return crops

    def latents(self, model: Autoencoder, limit: int | None = None) -> list[torch.Tensor]:
        """The training images' whole latents (C, h, w), through the encoder as it is."""
        codec = Codec(model, device=self.device)
        return [codec.encode_tensor(image_to_pixels(open_image(p)))[0].cpu() for p in self.paths[:limit]]

    def model(self, config: CodecConfig) -> Autoencoder:
        model = super().model(config)
        source = Autoencoder.from_pretrained(resolve_weights(self.opts.init_from)) if self.opts.init_from else None
        if source is not None and source.levels is not None and source.levels.count == len(self.lambdas):
            steps, offset = source.levels.steps, source.levels.offset
        else:  # a ladder of steps from 0.09 down to 0.007 of the latents' spread, each channel by its own spread
            flat = torch.cat([z.flatten(1) for z in self.latents(model, limit=16)], 1)
            offset, spread = flat.mean(1), flat.std(1)
            ladder = torch.logspace(math.log10(0.09), math.log10(0.007), len(self.lambdas))
            steps = ladder[:, None] * (spread / spread.mean())[None]
        model.rate = RateProxy(steps, offset)
        model.train()
        return model

    def loss(self, net: torch.nn.Module, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch.to(self.device, non_blocking=True)
        levels = (torch.arange(len(images), device=self.device) + step) % len(self.lambdas)
        noise = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + step)  # a function of (seed, step)
        with self.amp:
            decoded, bits = net(images, levels, noise)
        error = (decoded.float() - images).pow(2).flatten(1).mean(1)
        bpp = bits / (images.shape[-1] * images.shape[-2])
        weight = self.lambdas[levels]
        loss = ((weight * error + bpp) / weight.sqrt()).mean()
        return loss, {"loss": loss.item(), "psnr": psnr(images, decoded.detach().float()), "bpp": bpp.mean().item()}

    def validate(self, model: Autoencoder) -> dict[str, float]:
        return {}

    def final(self, model: Autoencoder, config: CodecConfig) -> Autoencoder:
        final = Autoencoder(config)
        final.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("rate.")})
        final.eval()
        final.levels.offset.copy_(model.rate.offset)
        export_levels(final.levels, model.rate.steps().cpu(), self.latents(final))
        return final


def train(opts: TrainOptions, report: Reporter | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train encoder and decoder together; writes --out (the best or final EMA weights).

    With --lambdas, the rate-distortion recipe: quality levels fine-tuned from --init-from; with
    --stage decoder, the decoder alone for --init-from's files."""
    if opts.stage == "decoder" and opts.init_from is not None:
        if opts.lambdas:
            raise CodecError("--stage decoder keeps --init-from's quality levels: leave out --lambdas")
        levels = initial_weights(opts.init_from, opts.model).config.quality_levels
        opts = dataclasses.replace(opts, model=dataclasses.replace(opts.model, quality_levels=levels))
        result = fit(DecoderStage(opts), opts, report, log)
    elif opts.lambdas:
        opts = dataclasses.replace(
            opts, model=dataclasses.replace(opts.model, quality_levels=len(parse_lambdas(opts.lambdas)))
        )
        result = fit(RateDistortion(opts), opts, report, log)
    else:
        result = fit(Photos(opts), opts, report, log)
    return TrainResult(**vars(result))
