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
from .data import RandomCrops, usable_images
from .errors import CodecError
from .images import image_to_tensor, open_image
from .metrics import ms_ssim_loss_value, psnr
from .models import Autoencoder, CodecConfig
from .options import TrainOptions
from .training import FitResult, Recipe, Reporter, fit

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
    """Mean PSNR over whole validation images, through real 8-bit latents."""
    codec = Codec(model, device=device)
    scores = []
    for path in paths:
        image = image_to_tensor(open_image(path)).to(device)
        scores.append(psnr(image, codec.roundtrip_tensor(image)))
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
        model = Autoencoder(config)
        if self.opts.init_from:
            source = Autoencoder.from_pretrained(self.opts.init_from)
            if source.config != dataclasses.replace(config, name=source.config.name):
                raise CodecError(f"{self.opts.init_from}: its config {source.config} differs from this run's {config}")
            model.load_state_dict(source.state_dict())
        return model

    def loss(self, net: torch.nn.Module, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch.to(self.device, non_blocking=True)
        with self.amp:
            decoded = net(images)
            loss = reconstruction_loss(self.opts.loss, images, decoded.float())
        return loss, {"loss": loss.item(), "psnr": psnr(images, decoded.detach().float())}

    def validate(self, model: Autoencoder) -> dict[str, float]:
        return {"val_psnr": validate(model, self.val_paths, self.device)} if self.val_paths else {}


def train(opts: TrainOptions, report: Reporter | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train encoder and decoder together; writes --out (the best or final EMA weights)."""
    result = fit(Photos(opts), opts, report, log)
    return TrainResult(**vars(result))
