"""The training loop's machinery, shared by every recipe (`train.py`: photos; `distill.py`: SD latents).

AdamW with warm-up and cosine decay, gradient clipping, an EMA of the weights (buffers included),
torchrun's ranks, and atomic checkpoints from which a killed run resumes exactly.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .errors import CodecError
from .options import RunFiles
from .paths import write_atomic

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


class Optimization:
    """A run's optimizer, schedule, clipping and EMA: one `step(loss)` per batch.

    `clip_groups` are the parameter groups whose gradient norms are clipped separately (the whole
    model for `train`; encoder and decoder for `distill`, whose two losses differ in scale).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        warmup: int,
        steps: int,
        ema: float,
        clip: float,
        clip_groups: Iterable[torch.nn.Module] | None = None,
    ) -> None:
        self.model, self.clip = model, clip
        self.clip_groups = list(clip_groups) if clip_groups is not None else [model]
        self.ema = None
        if ema > 0:
            self.ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=warmup_ema(ema), use_buffers=True)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, steps))

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            for group in self.clip_groups:
                torch.nn.utils.clip_grad_norm_(group.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def current(self) -> torch.nn.Module:
        """The weights to validate and export: the EMA's where there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state(self, kind: str, opts: RunFiles, step: int, seconds: float) -> dict:
        """What a checkpoint of any recipe holds in common."""
        state = {
            "format": kind,
            "config": opts.model.to_json(),
            "options": opts.to_dict(),
            "step": step,
            "seconds": seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def restore(self, state: dict) -> None:
        """Load what `state` saved back into the model, optimizer, schedule and EMA."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])


class Distributed:
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
