"""Every recipe's options, declared once: the library reads them, and the CLI builds its flags and help
from them. Pure data (no torch), so that `hybrid-codec --help` starts at once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .config import CodecConfig


def option(default: object = dataclasses.MISSING, help: str = "", argument: bool = False) -> dataclasses.Field:
    """A recipe option, declared once: the CLI builds its flag (or argument) and help text from this."""
    return dataclasses.field(default=default, metadata={"help": help, "argument": argument})


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


def sd_config(encoder_hidden: int = 12, decoder_hidden: int = 16, decoder_kernel: int = 3) -> CodecConfig:
    return CodecConfig(
        name="sd",
        latent_space="sd",
        encoder_hidden=encoder_hidden,
        decoder_hidden=decoder_hidden,
        decoder_kernel=decoder_kernel,
    )


@dataclass
class TrainOptions(RunFiles):
    data_dir: Path = option(help="Folder of training images (searched recursively).", argument=True)
    out: Path = option(help="Weights file to write (.safetensors).")
    steps: int = option(10_000, "Optimizer steps.")
    batch_size: int = option(8, "Crops per step.")
    crop: int = option(128, "Side of the square training crops, a multiple of 8.")
    lr: float = option(2e-3, "Peak learning rate (AdamW), after the warm-up.")
    warmup: int = option(300, "Steps of linear warm-up before the cosine decay.")
    loss: str = option("mse", "mse, psnr (mean per-crop PSNR), ms-ssim or mix.")
    ema: float = option(0.999, "EMA decay of the weights (0: off).")
    clip: float = option(1.0, "Gradient-norm clipping (0: off).")
    min_scale: float = option(0.25, "Crops are shown at random scales from min_scale to 1.")
    val_dir: Path | None = option(None, "Folder of validation images.")
    val_every: int = option(1000, "Validate every N steps.")
    val_limit: int = option(0, "Validate on the first N images (0: all).")
    checkpoint_every: int = option(250, "Write the checkpoint (<out>.ckpt) every N steps.")
    resume: Path | None = option(None, "Checkpoint to resume from.")
    init_from: Path | None = option(None, "Weights to fine-tune from.")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps.")
    seed: int = option(0, "Seed of the initialisation and the crops.")
    workers: int = option(2, "Data-loading worker processes.")
    model: CodecConfig = dataclasses.field(default_factory=CodecConfig)
    force: bool = option(False, "Overwrite an existing --out and checkpoint (the run starts afresh).")


@dataclass
class DistillOptions(RunFiles):
    data_dir: Path = option(help="Folder of training images (searched recursively).", argument=True)
    out: Path = option(help="Weights file to write (.safetensors).")
    teacher: str | None = option(
        None,
        "diffusers AutoencoderKL: Hub id, local folder or .safetensors file (default: stabilityai/sd-vae-ft-mse).",
    )
    teacher_latents: Path | None = option(
        None, "Folder of precomputed targets <image>_y<Y>_x<X>.npy instead of a teacher."
    )
    steps: int = option(4000, "Optimizer steps.")
    batch_size: int = option(8, "Crops per step.")
    crop: int = option(128, "Side of the random 8-aligned training crops.")
    decoder_crop: int = option(0, "The decoder trains on a window this big of each crop (0: all).")
    lr: float = option(2e-3, "Peak learning rate (AdamW), after the warm-up.")
    warmup: int = option(200, "Steps of linear warm-up before the cosine decay.")
    ema: float = option(0.999, "EMA decay of the weights (0: off).")
    clip: float = option(1.0, "Gradient-norm clipping of encoder and decoder each (0: off).")
    image_weight: float = option(1.0, "Weight of the decoder's MSE beside the latent error.")
    val_dir: Path | None = option(None, "Folder of validation images.")
    holdout: int = option(0, "Validate on the last N images of DATA_DIR instead of training.")
    val_every: int = option(250, "Validate every N steps.")
    checkpoint_every: int = option(100, "Write the checkpoint (<out>.ckpt) every N steps.")
    max_minutes: float = option(0.0, "Stop after N minutes; --resume goes on (0: no limit).")
    resume: Path | None = option(None, "Checkpoint to resume from.")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps.")
    seed: int = option(0, "Seed of the initialisation and the crops.")
    model: CodecConfig = dataclasses.field(default_factory=sd_config)
