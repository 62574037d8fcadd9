"""Training the codec: `hybrid-codec train`, or `torchrun --nproc_per_node N -m hybrid_codec train ...`.

The recipe: random multi-scale crops, quantization-aware training (the decoder always sees
8-bit latents, with a straight-through gradient), AdamW with warm-up and cosine decay,
gradient clipping, an EMA of the weights (buffers included), validation on a folder with the
best weights kept, and atomic checkpoints from which a killed run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
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
from .paths import write_atomic

LOSSES = ("mse", "psnr", "ms-ssim", "mix")
REPRODUCIBLE = ("steps", "batch_size", "crop", "lr", "warmup", "loss", "ema", "clip", "min_scale", "seed")
"""Options that must not change across --resume for the run to end as the uninterrupted one would."""


class RunFiles:
    """What training and distillation options share: the checkpoint's place, and a plain-dict form."""

    out: Path
    model: CodecConfig

    @property
    def checkpoint(self) -> Path:
        """Where the run's checkpoint lives: beside --out, named after it."""
        return self.out.with_name(self.out.name.removesuffix(".safetensors") + ".ckpt")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_json()
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


@dataclass
class TrainOptions(RunFiles):
    data_dir: Path
    out: Path
    steps: int = 10_000
    batch_size: int = 8
    crop: int = 128
    lr: float = 2e-3
    warmup: int = 300
    loss: str = "mse"
    ema: float = 0.999  # EMA decay of the weights; 0 turns the EMA off
    clip: float = 1.0  # gradient-norm clipping; 0 turns it off
    min_scale: float = 0.25  # crops are shown at scales from min_scale to 1
    val_dir: Path | None = None
    val_every: int = 1000
    val_limit: int = 0  # validate on the first N images only (0: all)
    checkpoint_every: int = 250
    resume: Path | None = None
    init_from: Path | None = None
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    model: CodecConfig = dataclasses.field(default_factory=CodecConfig)
    force: bool = False  # start afresh over an existing --out or checkpoint


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    last_loss: float
    best_val_psnr: float | None


Reporter = Callable[[int, int, dict], None]
"""Called after every step with (step, total_steps, metrics): the CLI draws it."""


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_ema(decay: float):
    """EMA whose decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates.

    A fixed 0.999 would still hold a third of the random initialisation at step 1000; the ramp
    forgets it within a few dozen steps. Integer buffers (BatchNorm's counter) are copied.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        for a, c in zip(averaged, current, strict=True):
            if not a.is_floating_point():
                a.copy_(c)  # counters such as BatchNorm's num_batches_tracked

    return update


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


class _Distributed:
    """torchrun's environment: rank, world size, and whether this process writes files."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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


def run_state(kind: str, opts: RunFiles, step: int, seconds: float, model, optimizer, scheduler, ema) -> dict:
    """What a checkpoint of a training or distillation run holds in common."""
    state = {
        "format": kind,
        "config": opts.model.to_json(),
        "options": opts.to_dict(),
        "step": step,
        "seconds": seconds,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def restore_run_state(state: dict, model, optimizer, scheduler, ema) -> None:
    """Load what `run_state` saved back into a run's model, optimizer, schedule and EMA."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and "ema" in state:
        ema.load_state_dict(state["ema"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a run killed at any moment leaves the previous checkpoint or the new one."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CodecError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CodecError(f"{path}: not a readable training checkpoint ({type(exc).__name__})") from None


def train(opts: TrainOptions, report: Reporter | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train encoder and decoder together; writes --out (the best or final EMA weights)."""
    check_options(opts)
    dist = _Distributed()
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
    ema = None
    if opts.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=warmup_ema(opts.ema), use_buffers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, opts.warmup, opts.steps))
    start, best_psnr, elapsed = 0, None, 0.0

    if opts.resume:
        state = load_checkpoint(opts.resume)
        if state.get("format") != "hybrid-codec-checkpoint" or CodecConfig.from_json(state["config"]) != opts.model:
            raise CodecError(f"{opts.resume}: not a checkpoint of this model configuration")
        restore_run_state(state, model, optimizer, scheduler, ema)
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

    def current() -> torch.nn.Module:
        return ema.module if ema is not None else model

    def checkpoint(step: int) -> None:
        seconds = elapsed + time.monotonic() - began
        state = run_state("hybrid-codec-checkpoint", opts, step, seconds, model, optimizer, scheduler, ema)
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
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opts.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_value = loss.item()
        metrics = {"loss": loss_value, "psnr": psnr(images, decoded.detach().float()), "lr": scheduler.get_last_lr()[0]}
        if val_paths and (step % opts.val_every == 0 or step == opts.steps):
            if dist.main:
                metrics["val_psnr"] = validate(current(), val_paths, device)
                if best_psnr is None or metrics["val_psnr"] > best_psnr:
                    best_psnr = metrics["val_psnr"]
                    export_weights(current(), opts.out)
                current().train()
                model.train()
            dist.barrier()
        if dist.main and (step % opts.checkpoint_every == 0 or step == opts.steps):
            checkpoint(step)
        if dist.main and report:
            report(step, opts.steps, metrics)
    if dist.main and not val_paths:
        export_weights(current(), opts.out)
    dist.barrier()
    dist.close()
    return TrainResult(opts.out, step, elapsed + time.monotonic() - began, loss_value, best_psnr)
