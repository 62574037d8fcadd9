"""Training the codec: `hybrid-codec train`, or `torchrun --nproc_per_node N -m hybrid_codec train ...`.

The recipe: random multi-scale crops, quantization-aware training (the decoder always sees
8-bit latents, with a straight-through gradient), AdamW with warm-up and cosine decay,
gradient clipping, an EMA of the weights (buffers included), validation on a folder with the
best weights kept, and atomic checkpoints from which a killed run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .codec import Codec, pick_device
from .data import RandomCrops, StepSampler, usable_images
from .errors import CodecError
from .images import image_to_tensor, open_image
from .metrics import ms_ssim_loss_value, psnr
from .models import Autoencoder, CodecConfig
from .options import TrainOptions
from .training import Distributed, Optimization, Reporter, load_checkpoint, save_checkpoint

LOSSES = ("mse", "psnr", "ms-ssim", "mix")
REPRODUCIBLE = ("steps", "batch_size", "crop", "lr", "warmup", "loss", "ema", "clip", "min_scale", "seed")
"""Options that must not change across --resume for the run to end as the uninterrupted one would."""


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    last_loss: float
    best_val_psnr: float | None


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


def check_options(opts: TrainOptions) -> None:
    """Refuse settings that cannot work, with the option's name, before anything starts."""
    from .runtime import check_device

    if opts.loss not in LOSSES:
        raise CodecError(f"unknown loss {opts.loss!r}; expected one of {LOSSES}")
    f = opts.model.downscale
    if opts.crop < f or opts.crop % f:
        raise CodecError(f"--crop must be a positive multiple of {f}, not {opts.crop}")
    positive = {"steps": opts.steps, "batch-size": opts.batch_size, "val-every": opts.val_every}
    positive["checkpoint-every"] = opts.checkpoint_every
    for name, value in positive.items():
        if value < 1:
            raise CodecError(f"--{name} must be at least 1, not {value}")
    for name, value in {"warmup": opts.warmup, "workers": opts.workers, "val-limit": opts.val_limit}.items():
        if value < 0:
            raise CodecError(f"--{name} must not be negative, not {value}")
    if not (math.isfinite(opts.lr) and opts.lr > 0):
        raise CodecError(f"--lr must be a positive number, not {opts.lr}")
    if not 0 <= opts.ema < 1:
        raise CodecError(f"--ema must be in [0, 1), not {opts.ema}")
    if not (math.isfinite(opts.clip) and opts.clip >= 0):
        raise CodecError(f"--clip must be 0 (off) or positive, not {opts.clip}")
    if not 0 < opts.min_scale <= 1:
        raise CodecError(f"--min-scale must be in (0, 1], not {opts.min_scale}")
    check_device(str(opts.device))
    if opts.resume is None and not opts.force:
        for existing in (opts.out, opts.checkpoint):
            if existing.exists():
                raise CodecError(
                    f"{existing} exists; --resume {opts.checkpoint} to continue that run, or --force to start afresh"
                )


def train(opts: TrainOptions, report: Reporter | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train encoder and decoder together; writes --out (the best or final EMA weights)."""
    check_options(opts)
    dist = Distributed()
    device = pick_device(opts.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    dist.init(device)
    quiet = (lambda message: None) if not dist.main else log

    if dist.main and not opts.out.parent.is_dir():
        try:
            opts.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CodecError(f"{opts.out.parent}: cannot create folder ({exc.strerror or exc})") from None
    paths = usable_images(opts.data_dir, warn=quiet)
    val_paths = usable_images(opts.val_dir, warn=quiet) if opts.val_dir else []
    if opts.val_limit:
        val_paths = val_paths[: opts.val_limit]

    torch.manual_seed(opts.seed)
    model = Autoencoder(opts.model)
    if opts.init_from:
        source = Autoencoder.from_pretrained(opts.init_from)
        if source.config != dataclasses.replace(opts.model, name=source.config.name):
            raise CodecError(f"{opts.init_from}: its config {source.config} differs from this run's {opts.model}")
        model.load_state_dict(source.state_dict())
    model.to(device)
    run = Optimization(model, opts.lr, opts.warmup, opts.steps, opts.ema, opts.clip)
    start, best_psnr, elapsed = 0, None, 0.0

    if opts.resume:
        state = load_checkpoint(opts.resume)
        if state.get("format") != "hybrid-codec-checkpoint" or CodecConfig.from_json(state["config"]) != opts.model:
            raise CodecError(f"{opts.resume}: not a checkpoint of this model configuration")
        run.restore(state)
        start, best_psnr, elapsed = state["step"], state["best_val_psnr"], state["seconds"]
        quiet(f"resumed from {opts.resume} at step {start}")
        changed = [
            f"{key} {before!r} -> {now!r}"
            for key, now in opts.to_dict().items()
            if key in REPRODUCIBLE and (before := state.get("options", {}).get(key, now)) != now
        ]
        if changed:
            quiet(f"resuming with changed options ({', '.join(changed)}): not the run the checkpoint began")

    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    crops = RandomCrops(paths, opts.crop, opts.seed, opts.min_scale)
    loader = torch.utils.data.DataLoader(
        crops,
        batch_size=opts.batch_size,
        sampler=StepSampler(start, opts.steps, opts.batch_size, dist.rank, dist.world),
        num_workers=opts.workers,
        persistent_workers=False,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if opts.workers else None,
    )
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def export_weights(source: torch.nn.Module, path: Path) -> None:
        final = Autoencoder(opts.model)
        final.load_state_dict(source.state_dict())
        final.save_pretrained(path)

    def checkpoint(step: int) -> None:
        seconds = elapsed + time.monotonic() - began
        state = run.state("hybrid-codec-checkpoint", opts, step, seconds)
        save_checkpoint(opts.checkpoint, {**state, "best_val_psnr": best_psnr})

    began = time.monotonic()
    loss_value, step = math.nan, start
    model.train()
    for step, images in enumerate(loader, start=start + 1):
        images = images.to(device, non_blocking=True)
        with amp:
            decoded = net(images)
            loss = reconstruction_loss(opts.loss, images, decoded.float())
        if not torch.isfinite(loss):
            raise CodecError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
        run.step(loss)
        loss_value = loss.item()
        metrics = {"loss": loss_value, "psnr": psnr(images, decoded.detach().float()), "lr": run.lr()}
        if val_paths and (step % opts.val_every == 0 or step == opts.steps):
            if dist.main:
                metrics["val_psnr"] = validate(run.current(), val_paths, device)
                if best_psnr is None or metrics["val_psnr"] > best_psnr:
                    best_psnr = metrics["val_psnr"]
                    export_weights(run.current(), opts.out)
                run.current().train()
                model.train()
            dist.barrier()
        if dist.main and (step % opts.checkpoint_every == 0 or step == opts.steps):
            checkpoint(step)
        if dist.main and report:
            report(step, opts.steps, metrics)
    if dist.main and not val_paths:
        export_weights(run.current(), opts.out)
    dist.barrier()
    dist.close()
    return TrainResult(opts.out, step, elapsed + time.monotonic() - began, loss_value, best_psnr)
