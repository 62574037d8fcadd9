"""The one training loop, shared by every recipe (`train.py`: photos; `distill.py`: SD latents).

`fit(recipe, opts)` runs it: AdamW with warm-up and cosine decay, gradient clipping, an EMA of the
weights (buffers included), torchrun's ranks, validation with the chosen weights exported, progress
reports, a time budget, and atomic checkpoints from which a killed run resumes exactly. A `Recipe`
says only what differs: its data, its loss and its validation.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import StepSampler
from .errors import CodecError
from .inputs import read_input
from .layers import anneal_temperature
from .models import Autoencoder, CodecConfig
from .options import LoopOptions, option_info
from .paths import check_writable, write_atomic

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

    def state(self, kind: str, opts: LoopOptions, step: int, seconds: float) -> dict:
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
    """A checkpoint's dict, its structure checked: a list, a missing model or odd JSON is one CodecError."""
    data = read_input(path, "checkpoint")
    try:
        with warnings.catch_warnings():  # a foreign pickle makes torch warn about its protocol
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - damaged bytes make the unpickler raise almost anything
        raise CodecError(f"{path}: not a readable training checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CodecError(f"{path}: not a training checkpoint (it holds a {type(state).__name__}, not a dict)")
    for key, kinds in CHECKPOINT_FIELDS.items():
        if not isinstance(state.get(key), kinds) or isinstance(state.get(key), bool):
            raise CodecError(f"{path}: not a training checkpoint (its {key!r} is missing or of the wrong type)")
    if state["step"] < 0 or not math.isfinite(state["seconds"]):
        raise CodecError(f"{path}: not a training checkpoint (step {state['step']}, seconds {state['seconds']})")
    for key in ("options", "val", "ema"):
        if key in state and not isinstance(state[key], dict):
            raise CodecError(f"{path}: not a training checkpoint (its {key!r} is not a dict)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise CodecError(f"{path}: not a training checkpoint (its model is not a dict of tensors)")
    try:
        CodecConfig.from_json(state["config"])
    except CodecError as exc:
        raise CodecError(f"{path}: {exc}") from None
    return state


CHECKPOINT_FIELDS = {
    "format": str,
    "config": str,
    "step": int,
    "seconds": (int, float),
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
}
"""What every checkpoint holds, by type (`Optimization.state`)."""


def initial_weights(source: str | Path, config: CodecConfig) -> Autoencoder:
    """--init-from's weights (a shipped name or a file), refused unless their layers are `config`'s."""
    from .zoo import resolve_weights

    model = Autoencoder.from_pretrained(resolve_weights(source))
    same = dataclasses.replace(config, name=model.config.name, quality_levels=model.config.quality_levels)
    if model.config != same:
        raise CodecError(f"{source}: its config {model.config} differs from this run's {config}")
    return model


# ---------------------------------------------------------------- the loop


class Recipe:
    """What one kind of training says; `fit` does the rest.

    A recipe fills in `checkpoint_format`, `setup` (its data) and `loss`; where it validates, also
    `validate` and `best_by`. `state`/`restore` keep anything else it needs in the checkpoint.
    """

    checkpoint_format: str
    """Written into and required of its checkpoints: a run resumes only its own recipe's."""
    best_by: str | None = None
    """The validation metric (higher is better) whose best weights --out keeps; None: the latest's."""

    def check(self) -> None:
        """Refuse the recipe's own options that cannot work, before anything starts."""

    def setup(self, device: torch.device, log: Callable[[str], None]) -> torch.utils.data.Dataset:
        """Read the data; item i of the returned dataset is the run's sample i (from the seed and i alone)."""
        raise NotImplementedError

    opts: LoopOptions

    def model(self, config: CodecConfig) -> Autoencoder:
        """The weights the run starts from (called after seeding): --init-from's, where given. An
        encoder stage of another encoder size takes only its decoder: the encoder starts afresh."""
        model = Autoencoder(config)
        if self.opts.init_from and self.opts.stage == "encoder":
            from .zoo import resolve_weights

            hidden = Autoencoder.from_pretrained(resolve_weights(self.opts.init_from)).config.encoder_hidden
            if hidden != config.encoder_hidden:
                source = initial_weights(self.opts.init_from, dataclasses.replace(config, encoder_hidden=hidden))
                model.decoder.load_state_dict(source.decoder.state_dict())
                return model
        if self.opts.init_from:
            source = initial_weights(self.opts.init_from, config)
            weights = {k: v for k, v in source.state_dict().items() if not k.startswith("levels.")}
            model.load_state_dict(weights, strict=False)  # the levels are this run's own
        return model

    def clip_groups(self, model: Autoencoder) -> list[torch.nn.Module]:
        """The parts whose gradient norms are clipped separately."""
        return [model]

    def loss(self, net: torch.nn.Module, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch (as the loader gives it) and the step's metrics to report.

        `net` is the model, wrapped for DDP under torchrun: call it, not its parts, to train in
        several processes.
        """
        raise NotImplementedError

    def validate(self, model: Autoencoder) -> dict[str, float]:
        """Validation metrics (keys starting with "val") of these weights; {}: no validation."""
        return {}

    def final(self, model: Autoencoder, config: CodecConfig) -> Autoencoder:
        """The weights --out gets from the trained (EMA) model."""
        final = Autoencoder(config)
        final.load_state_dict(model.state_dict())
        return final

    def state(self) -> dict:
        """What else the checkpoint keeps for this recipe."""
        return {}

    def restore(self, state: dict) -> None:
        """Take back what `state` kept, on --resume."""


class Interrupted(CodecError):
    """Ctrl-C during a run: where its last checkpoint is and how many steps it holds (None: no checkpoint yet)."""

    def __init__(self, step: int, checkpoint: Path | None, saved_step: int | None) -> None:
        self.step, self.checkpoint, self.saved_step = step, checkpoint, saved_step
        if checkpoint is None:
            super().__init__(f"interrupted at step {step}, before the first checkpoint: nothing to resume")
        else:
            super().__init__(
                f"interrupted at step {step}; the checkpoint {checkpoint} holds step {saved_step}: "
                f"--resume {checkpoint} goes on"
            )


@dataclass
class FitResult:
    out: Path
    steps: int
    seconds: float
    finished: bool  # False when --max-minutes stopped it early: --resume continues
    metrics: dict[str, float] = field(default_factory=dict)  # the last step's
    val: dict[str, float] = field(default_factory=dict)  # the last validation's
    best: float | None = None  # the best validation's `best_by` metric
    checkpoint: Path | None = None  # the run's checkpoint, which stays: --resume with a higher --steps goes on


STAGES = ("both", "encoder", "decoder")
"""What `--stage` trains: both halves, or one with the other kept as --init-from has it."""
MAX_BATCH_BYTES = 1 << 30
"""Largest batch of float32 crops a step may take (`--batch-size` x `--crop`^2 x 3 x 4 bytes); the
model's activations are several times that. The recipes' defaults take 1.5 to 3 MB."""


def train_mode(model: torch.nn.Module) -> None:
    """Train mode, except for a part that does not train (a stage's kept half): its BatchNorm
    statistics must stay those it was trained with, or it would change without a gradient."""
    model.train()
    for part in model.children():
        if any(True for _ in part.parameters()) and not any(p.requires_grad for p in part.parameters()):
            part.eval()


def check_loop_options(opts: LoopOptions) -> None:
    """Refuse loop settings that cannot work, with the option's name, before anything starts."""
    from .runtime import check_device

    f = opts.model.downscale
    if opts.crop < f or opts.crop % f:
        raise CodecError(f"--crop must be a positive multiple of {f}, not {opts.crop}")
    positive = {"steps": opts.steps, "batch-size": opts.batch_size, "val-every": opts.val_every}
    positive["checkpoint-every"] = opts.checkpoint_every
    for name, value in positive.items():
        if value < 1:
            raise CodecError(f"--{name} must be at least 1, not {value}")
    for name, value in {"warmup": opts.warmup, "workers": opts.workers, "max-minutes": opts.max_minutes}.items():
        if not value >= 0:  # NaN too
            raise CodecError(f"--{name} must not be negative, not {value}")
    if not (math.isfinite(opts.lr) and opts.lr > 0):
        raise CodecError(f"--lr must be a positive number, not {opts.lr}")
    if not 0 <= opts.ema < 1:
        raise CodecError(f"--ema must be in [0, 1), not {opts.ema}")
    if opts.temperature_steps < 0:
        raise CodecError(f"--temperature-steps must not be negative, not {opts.temperature_steps}")
    if not (math.isfinite(opts.clip) and opts.clip >= 0):
        raise CodecError(f"--clip must be 0 (off) or positive, not {opts.clip}")
    if not 0 <= opts.seed < 2**32:  # numpy's generators take no negative seed, torch's none past 64 bits
        raise CodecError(f"--seed must be from 0 to {2**32 - 1}, not {opts.seed}")
    batch_bytes = opts.batch_size * opts.crop**2 * 3 * 4
    if batch_bytes > MAX_BATCH_BYTES:  # before a worker allocates it: a huge batch grew until the kernel killed it
        raise CodecError(
            f"--batch-size {opts.batch_size} of --crop {opts.crop} crops is {batch_bytes / 2**30:,.1f} GiB of pixels "
            f"a step (at most {MAX_BATCH_BYTES / 2**30:g} GiB)"
        )
    if opts.stage not in STAGES:
        raise CodecError(f"--stage must be one of {', '.join(STAGES)}, not {opts.stage!r}")
    if opts.stage == "decoder" and opts.init_from is None:
        raise CodecError("--stage decoder trains a decoder for a given encoder: pass --init-from")
    if not 0 < opts.decoder_min_scale <= 1:
        raise CodecError(f"--decoder-min-scale must be in (0, 1], not {opts.decoder_min_scale}")
    if decoder_levels(opts) and opts.stage != "decoder":
        raise CodecError("--decoder-levels chooses what --stage decoder learns: pass --stage decoder too")
    check_device(str(opts.device))
    if opts.resume is None and not opts.force:
        for existing in (opts.out, opts.checkpoint):
            if os.path.lexists(existing):  # a dangling symlink too: writing would replace it
                raise CodecError(
                    f"{existing} exists; --resume {opts.checkpoint} to continue that run, or --force to start afresh"
                )


def decoder_levels(opts: LoopOptions) -> list[int]:
    """--decoder-levels as a list (empty: every level once); the recipe checks them against the model's levels."""
    text = opts.decoder_levels.strip()
    try:
        levels = [int(v) for v in text.split(",")] if text else []
    except ValueError:
        raise CodecError(f"--decoder-levels must be comma-separated level numbers, not {text!r}") from None
    if any(level < 1 for level in levels):
        raise CodecError(f"--decoder-levels are quality levels, 1 or more, not {text!r}")
    return levels


def changed_options(opts: LoopOptions, saved: dict) -> list[str]:
    """The options marked reproducible whose value differs from the checkpoint's, as "name old -> new"."""
    return [
        f"{key} {before!r} -> {now!r}"
        for key, now in opts.to_dict().items()
        if option_info(type(opts), key).get("reproducible") and (before := saved.get(key, now)) != now
    ]


def fit(
    recipe: Recipe, opts: LoopOptions, report: Reporter | None = None, log: Callable[[str], None] = print
) -> FitResult:
    """Run `recipe` for --steps (or --max-minutes), from scratch or --resume; writes --out and its checkpoint."""
    check_loop_options(opts)
    recipe.check()
    from .codec import pick_device

    dist = Distributed()
    device = pick_device(opts.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    dist.init(device)
    quiet = log if dist.main else (lambda message: None)
    if dist.main:  # its folders are made with its first file, and removed if that fails
        check_writable(opts.out)
        check_writable(opts.checkpoint)
    dataset = recipe.setup(device, quiet)

    torch.manual_seed(opts.seed)
    model = recipe.model(opts.model).to(device)
    run = Optimization(model, opts.lr, opts.warmup, opts.steps, opts.ema, opts.clip, recipe.clip_groups(model))
    start, elapsed, val, best = 0, 0.0, {}, None
    best_key = f"best_{recipe.best_by}"
    if opts.resume:
        state = load_checkpoint(opts.resume)
        if state.get("format") != recipe.checkpoint_format or CodecConfig.from_json(state["config"]) != opts.model:
            kind = recipe.checkpoint_format
            raise CodecError(f"{opts.resume}: not a checkpoint of this model configuration ({kind})")
        try:
            run.restore(state)
            recipe.restore(state)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
            reason = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
            raise CodecError(f"{opts.resume}: its state does not fit this run ({reason[:200]})") from None
        start, elapsed, val, best = state["step"], state["seconds"], state.get("val", {}), state.get(best_key)
        if start >= opts.steps:
            raise CodecError(f"{opts.resume} is already at step {start} of {opts.steps}: raise --steps to go on")
        quiet(f"resumed from {opts.resume} at step {start}")
        if changed := changed_options(opts, state.get("options", {})):
            quiet(f"resuming with changed options ({', '.join(changed)}): not the run the checkpoint began")
    if opts.warmup >= opts.steps:
        quiet(
            f"warning: --warmup {opts.warmup} is not shorter than --steps {opts.steps}: the learning rate never "
            f"reaches --lr {opts.lr:g} (it ends at {lr_factor(opts.steps - 1, opts.warmup, opts.steps):.2g} of it); "
            f"pass e.g. --warmup {opts.steps // 10}"
        )
    quiet(f"checkpoint every {opts.checkpoint_every} steps to {opts.checkpoint} (kept after the run)")

    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=opts.batch_size,
        sampler=StepSampler(start, opts.steps, opts.batch_size, dist.rank, dist.world),
        num_workers=opts.workers,
        persistent_workers=False,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if opts.workers else None,
    )

    def export() -> None:
        recipe.final(run.current(), opts.model).save_pretrained(opts.out)

    def checkpoint(step: int) -> None:
        state = run.state(recipe.checkpoint_format, opts, step, elapsed + time.monotonic() - began)
        extra = {best_key: best} if recipe.best_by else {}
        save_checkpoint(opts.checkpoint, {**state, **recipe.state(), "val": val, **extra})

    began = time.monotonic()
    step, finished, metrics = start, True, {}
    saved = (opts.resume, start) if opts.resume else (None, None)  # the checkpoint a Ctrl-C leaves
    train_mode(model)
    try:
        for step, batch in enumerate(loader, start=start + 1):
            anneal_temperature(model, step - 1, opts.temperature_steps)  # the EMA copy keeps inference's 1
            loss, metrics = recipe.loss(net, batch, step)
            if not torch.isfinite(loss):
                raise CodecError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
            run.step(loss)
            metrics = {**metrics, "lr": run.lr()}
            out_of_time = opts.max_minutes > 0 and (time.monotonic() - began) / 60 >= opts.max_minutes
            last = step == opts.steps or out_of_time
            if step % opts.val_every == 0 or last:
                if dist.main and (latest := recipe.validate(run.current())):
                    val = latest
                    metrics.update(val)
                    score = val[recipe.best_by] if recipe.best_by else None
                    if score is None or best is None or score > best:
                        best = score
                        export()
                    train_mode(run.current())
                    train_mode(model)
                dist.barrier()
            if dist.main and (step % opts.checkpoint_every == 0 or last):
                checkpoint(step)
                saved = (opts.checkpoint, step)
            if dist.main and report:
                report(step, opts.steps, metrics)
            if out_of_time and step < opts.steps:
                quiet(f"--max-minutes {opts.max_minutes:g} reached at step {step}; --resume {opts.checkpoint} goes on")
                finished = False
                break
    except KeyboardInterrupt:  # the run can go on from its last checkpoint: say which, and from where
        raise Interrupted(step, *saved) from None
    if dist.main and not val:
        export()
    dist.barrier()
    dist.close()
    seconds = elapsed + time.monotonic() - began
    return FitResult(opts.out, step, seconds, finished, metrics, val, best, opts.checkpoint)
