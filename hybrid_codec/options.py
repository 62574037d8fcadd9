"""Every recipe's options, declared once: the library reads them, and the CLI builds its flags and help
from them. Pure data (no torch), so that `hybrid-codec --help` starts at once.

`LoopOptions` holds what the training loop itself reads; a recipe's options inherit them and add
their own. A recipe that wants another default redeclares only the default (`steps: int = 4000`):
the help stays where the option was declared, found by `option_info`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import CodecConfig


def option(
    default: object = dataclasses.MISSING, help: str = "", argument: bool = False, reproducible: bool = False
) -> dataclasses.Field:
    """A recipe option, declared once: the CLI builds its flag (or argument) and help text from this.

    `reproducible`: changing it across --resume makes a run that ends otherwise than the one the
    checkpoint began (the loop says so when it resumes).
    """
    metadata = {"help": help, "argument": argument, "reproducible": reproducible}
    return dataclasses.field(default=default, metadata=metadata)


def option_info(options_class: type, name: str) -> Mapping:
    """The help and flags of option `name`: from the class up the hierarchy that declared them."""
    for cls in options_class.__mro__:
        declared = getattr(cls, "__dataclass_fields__", {}).get(name)
        if declared is not None and "help" in declared.metadata:
            return declared.metadata
    return {}


MODEL_FIELD_HELP = {
    "name": "Model name written into the config and into every latent file it makes.",
    "encoder_hidden": "Encoder size: hidden units of each predictor (hybrid) or kernels K (dycnn, dynet); "
    "see docs/training.md and docs/layers.md.",
    "decoder_hidden": "Decoder size: hidden units of each predictor (hybrid) or kernels K (dycnn, dynet).",
    "family": "Layer family of encoder and decoder: hybrid (DynamicConv), dycnn, dynet or conv (docs/layers.md).",
    "decoder_kernel": "Decoder kernel size, odd (model size, see docs/training.md).",
}


def model_name_for(out: Path) -> str:
    """A trained model's default name: its weights file's, so that its latents say which file decodes them."""
    return out.name.removesuffix(".safetensors")


SD_LEVELS = 6
SD_STEP_RANGE = (0.24, 0.03)
"""The `sd` model's quality levels: steps from 0.24 to 0.03 of each channel's spread over the training
photos' latents, evenly on a log scale (SD space is not learned, so neither are its steps). The finest
is about an 8-bit min/max file's step, so the SD VAE sees what it saw in those files."""


def sd_config(encoder_hidden: int = 14, decoder_hidden: int = 16, decoder_kernel: int = 3) -> CodecConfig:
    return CodecConfig(
        name="sd",
        latent_space="sd",
        encoder_hidden=encoder_hidden,
        decoder_hidden=decoder_hidden,
        decoder_kernel=decoder_kernel,
        quality_levels=SD_LEVELS,
    )


@dataclass
class LoopOptions:
    """What every recipe's run has: data, output, schedule, EMA, clipping, validation, checkpoints."""

    data_dir: Path = option(help="Folder of training images (searched recursively).", argument=True)
    out: Path = option(help="Weights file to write (.safetensors).")
    steps: int = option(10_000, "Optimizer steps.", reproducible=True)
    batch_size: int = option(8, "Crops per step.", reproducible=True)
    crop: int = option(128, "Side of the square training crops, a multiple of 8.", reproducible=True)
    lr: float = option(2e-3, "Peak learning rate (AdamW), after the warm-up.", reproducible=True)
    warmup: int = option(300, "Steps of linear warm-up before the cosine decay.", reproducible=True)
    ema: float = option(0.999, "EMA decay of the weights (0: off).", reproducible=True)
    clip: float = option(1.0, "Gradient-norm clipping (0: off).", reproducible=True)
    temperature_steps: int = option(
        1000,
        "DY-CNN / DyNet families: their attention's temperature falls linearly from 30 to 1 over the first N steps "
        "(0: 1 throughout).",
        reproducible=True,
    )
    val_dir: Path | None = option(None, "Folder of validation images.")
    val_every: int = option(1000, "Validate every N steps.")
    checkpoint_every: int = option(250, "Write the checkpoint (<out>.ckpt) every N steps.")
    max_minutes: float = option(0.0, "Stop after N minutes; --resume goes on (0: no limit).")
    resume: Path | None = option(None, "Checkpoint to resume from.")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps.")
    seed: int = option(0, "Seed of the initialisation and the crops.", reproducible=True)
    init_from: Path | None = option(None, "Weights to fine-tune from (a shipped name or a file).")
    stage: str = option(
        "both",
        "both: encoder and decoder together; encoder: the encoder alone (the decoder kept); decoder: the decoder "
        "alone, on the --init-from encoder's latents as its files store them (every quality level), of the photos "
        "at several scales.",
        reproducible=True,
    )
    decoder_min_scale: float = option(
        0.25, "--stage decoder shows the photos at scales from this to 1.", reproducible=True
    )
    decoder_levels: str = option(
        "",
        "--stage decoder learns the files of these quality levels, comma-separated, each as often as it is listed "
        "(e.g. 1,3,5,6,7,7,8,8,9,9; empty: every level once).",
        reproducible=True,
    )
    workers: int = option(2, "Data-loading worker processes.")
    model: CodecConfig = dataclasses.field(default_factory=CodecConfig)
    force: bool = option(False, "Overwrite an existing --out and checkpoint (the run starts afresh).")

    @property
    def checkpoint(self) -> Path:
        """Where the run's checkpoint lives: beside --out, named after it."""
        return self.out.with_name(self.out.name.removesuffix(".safetensors") + ".ckpt")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_json()
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


@dataclass
class TrainOptions(LoopOptions):
    loss: str = option("mse", "mse, psnr (mean per-crop PSNR), ms-ssim or mix.", reproducible=True)
    min_scale: float = option(0.25, "Crops are shown at random scales from min_scale to 1.", reproducible=True)
    val_limit: int = option(0, "Validate on the first N images (0: all).")
    lambdas: str = option(
        "",
        "Train quality levels with a rate term: per level, the weight of MSE against bits, comma-separated, "
        "smallest file first (e.g. 20,40,80,160,320,700,1600; see docs/training.md).",
        reproducible=True,
    )


@dataclass
class DistillOptions(LoopOptions):
    teacher: str | None = option(
        None,
        "diffusers AutoencoderKL: Hub id, local folder or .safetensors file (default: stabilityai/sd-vae-ft-mse).",
    )
    teacher_latents: Path | None = option(
        None, "Folder of precomputed targets <image>_y<Y>_x<X>.npy instead of a teacher."
    )
    decoder_crop: int = option(0, "The decoder trains on a window this big of each crop (0: all).", reproducible=True)
    image_weight: float = option(1.0, "Weight of the decoder's MSE beside the latent error.", reproducible=True)
    holdout: int = option(0, "Validate on the last N images of DATA_DIR instead of training.")
    clip: float = option(1.0, "Gradient-norm clipping of encoder and decoder each (0: off).", reproducible=True)
    # distill's own defaults; the help is LoopOptions'
    steps: int = 4000
    warmup: int = 200
    val_every: int = 250
    checkpoint_every: int = 100
    workers: int = 0
    model: CodecConfig = dataclasses.field(default_factory=sd_config)
