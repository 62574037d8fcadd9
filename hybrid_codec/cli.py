"""`hybrid-codec`: the command line. It parses and prints; the library does the work.

Every CodecError becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from .options import MODEL_FIELD_HELP, DistillOptions, TrainOptions, model_name_for, option_info


class PlainUsage(typer.core.TyperCommand):
    """Usage lines as click writes them (`INPUTS...`, `[PATH]`), not typer's `{inputs}...`, which users
    took for something to type."""

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 and not param.metavar else "")
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def get_help_option(self, ctx):
        return plain_flag(super().get_help_option(ctx))


CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
"""click's base error, wherever this typer keeps click (a vendored copy or the package)."""


class PlainGroup(typer.core.TyperGroup):
    """The top-level help shows `--help` as a flag too, and a usage error is one line, not click's box."""

    def get_help_option(self, ctx):
        return plain_flag(super().get_help_option(ctx))

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except CLICK_ERROR as exc:  # a bad option, a missing argument, an unreadable path
            where = getattr(getattr(exc, "ctx", None), "command_path", None)
            hint = f" (see {where} --help)" if where else ""
            error_line(f"{exc.format_message()}{hint}")
            sys.exit(exc.exit_code)
        except typer.Abort:
            error_line("interrupted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def plain_flag(option):
    """A flag, not `--help <bool>`."""
    if option is not None:
        option.metavar = ""
    return option


class CommandsApp(typer.Typer):
    """Every command gets the plain usage line."""

    def command(self, *args, **kwargs):
        return super().command(*args, cls=PlainUsage, **kwargs)


app = CommandsApp(
    cls=PlainGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="A tiny learned image codec: 48x smaller latents from one DynamicConv layer each way.",
)
stdout = Console(highlight=False, markup=False)  # paths and messages are printed as they are: `[/]` is text
err = Console(stderr=True, highlight=False, markup=False)

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Shipped model name (photo, native, sd) or a weights file.", show_default="photo"
    ),
]


def _device_name(value: str) -> str:
    """Refuse an unknown --device while parsing, as one line (an xpu or meta device gave a traceback)."""
    from .errors import CodecError
    from .runtime import check_device

    try:
        return check_device(value)
    except CodecError as exc:
        fail(str(exc))


DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", callback=_device_name)]
ForceOption = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.", metavar="")]
QualityOption = Annotated[
    int | None,
    typer.Option("--quality", "-q", help="Quality level, 1 (smallest file) to the model's highest.", show_default="6"),
]
MaxPixelsOption = Annotated[
    int | None,
    typer.Option(
        "--max-pixels",
        help="Largest image to accept: a memory guard, and Pillow's decompression-bomb limit.",
        show_default="64000000",
    ),
]
OutOption = Annotated[Path | None, typer.Option("--output", "-o", help="Output file (one input) or folder.")]


def _show_version(value: bool) -> None:
    if value:
        from .info import describe_runtime

        runtime = describe_runtime()
        stdout.print(
            f"hybrid-codec {runtime['hybrid-codec']} (torch {runtime['torch']}; CPU kernel: {runtime['CPU kernel']})",
            soft_wrap=True,
        )
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Show the version, torch's and the CPU kernel's, and exit.",
            is_eager=True,
            callback=_show_version,
            metavar="",
        ),
    ] = False,
) -> None:
    """A tiny learned image codec: 48x smaller latents from one DynamicConv layer each way."""


def one_line(message: str) -> str:
    """An error message as one line: a data-loader worker's copied traceback reduced to its last line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        last = lines[-1]
        name, sep, rest = last.partition(": ")
        lines = [rest if sep and "." in name and " " not in name else last]
    return " ".join(lines) or "failed"


def error_line(message: str) -> None:
    """The one way an error is shown: `error: ` and the message as plain text (no rich markup read from
    it: a path holding `[/]` or `[draft]` is printed as it is)."""
    err.print(Text.assemble(("error:", "bold red"), " ", one_line(message)), soft_wrap=True)


def fail(message: str) -> None:
    error_line(message)
    raise typer.Exit(1)


def reports_errors(command):
    """Turn the library's CodecError (and a few OS errors) into one line and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .errors import CodecError

        try:
            return command(*args, **kwargs)
        except CodecError as exc:
            fail(str(exc))
        except KeyboardInterrupt:  # Ctrl-C, and SIGTERM (see `main`)
            fail("interrupted")
        except MemoryError:
            fail("out of memory: try a smaller image or batch")
        except OSError as exc:  # a path the library did not check: still one line
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}")

    return wrapper


@app.command()
@reports_errors
def encode(
    inputs: Annotated[list[Path], typer.Argument(help="Images or folders of images.", metavar="IMAGES...")],
    output: OutOption = None,
    quality: QualityOption = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    max_pixels: MaxPixelsOption = None,
    force: ForceOption = False,
) -> None:
    """Encode images to latent files (<stem>.hyb beside each input, or into -o; -o NAME.latent.pt
    writes the torch.load-able dict instead; models without quality levels write only that)."""
    from .codec import encode_file, load_codec
    from .evaluation import bits_per_pixel
    from .info import human_bytes
    from .paths import LATENT_SUFFIX, PT_SUFFIX, expand_inputs, output_paths

    sources = expand_inputs(inputs)
    codec = load_codec(model, device, max_pixels)
    codec.check_quality(quality)  # a bad level is one error before any file
    suffix = LATENT_SUFFIX if codec.quality_levels else PT_SUFFIX  # without levels, a .pt is all there is
    file_suffixes = (LATENT_SUFFIX, ".pt") if codec.quality_levels else (".pt",)
    targets = output_paths(sources, output, suffix, force, file_suffixes)

    def one(source: Path, target: Path) -> str:
        latent, size = encode_file(codec, source, target, quality, overwrite=force)
        bpp = bits_per_pixel(size, latent.height, latent.width)
        level = f", quality {latent.level}" if latent.level is not None else ""
        return f"{source} -> {target} ({human_bytes(size)}, {bpp:.3f} bpp{level})"

    run_each(sources, targets, one, "encoding")


@app.command()
@reports_errors
def decode(
    inputs: Annotated[list[Path], typer.Argument(help="Latent files or folders of them.", metavar="LATENTS...")],
    output: OutOption = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Weights to decode with (default: the file's own model); with --decoder sd or taesd, the weights "
            "whose tables read a compact file.",
        ),
    ] = None,
    decoder: Annotated[
        str, typer.Option(help="hybrid (the model's own decoder), sd (the SD VAE) or taesd, for SD-space latents.")
    ] = "hybrid",
    vae: Annotated[
        str | None, typer.Option(help="SD VAE / TAESD to use: Hub id, local folder or (sd) a .safetensors file.")
    ] = None,
    device: DeviceOption = "auto",
    max_pixels: MaxPixelsOption = None,
    force: ForceOption = False,
) -> None:
    """Decode latent files to PNG (<stem>.decoded.png beside each input, or into -o)."""
    from .codec import Codecs, decode_file
    from .paths import DECODED_SUFFIX, LATENT_SUFFIXES, expand_inputs, output_paths

    if decoder not in ("hybrid", "sd", "taesd"):
        fail(f"unknown --decoder {decoder!r}; expected hybrid, sd or taesd")
    if decoder == "hybrid" and vae is not None:
        fail("--vae goes with --decoder sd or --decoder taesd")
    sources = expand_inputs(inputs, suffixes=LATENT_SUFFIXES)
    targets = output_paths(sources, output, DECODED_SUFFIX, force)
    if decoder == "hybrid":
        codecs = Codecs(model, device, max_pixels)

        def one(source: Path, target: Path) -> str:
            image = decode_file(codecs, source, target, overwrite=force)
            return f"{source} -> {target} ({image.width}x{image.height})"
    else:
        from .paths import save_image
        from .sd import LatentFileDecoder

        sd_decoder = LatentFileDecoder(decoder, vae, device, model)

        def one(source: Path, target: Path) -> str:
            image = sd_decoder.decode(source)
            save_image(image, target, overwrite=force)
            return f"{source} -> {target} ({image.width}x{image.height}, {decoder} decoder)"

    run_each(sources, targets, one, "decoding")


def progress_bar(*extra, **options):
    """The one look of every progress bar, on stderr: description, bar, N/M, time left, then `extra` columns."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, *extra, console=err, **options)


def run_each(sources: list[Path], targets: list[Path], job, description: str) -> None:
    """Run `job` on each pair; a progress bar for several; one error line per failure, exit 1 if any."""
    from .errors import CodecError

    failures = 0
    progress = progress_bar(disable=len(sources) < 2)
    with progress:
        task = progress.add_task(description, total=len(sources))
        for source, target in zip(sources, targets, strict=False):
            try:
                stdout.print(job(source, target), soft_wrap=True)
            except CodecError as exc:
                failures += 1
                error_line(str(exc))
            progress.advance(task)
    if failures:
        if len(sources) > 1:
            error_line(f"{failures} of {len(sources)} files failed")
        raise typer.Exit(1)


@app.command()
@reports_errors
def info(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A latent file (.hyb, .latent.pt) or weights file (.safetensors); none: this installation."
        ),
    ] = None,
) -> None:
    """Show what a latent file or a weights file holds; without one, what runs here (versions, CPU kernel)."""
    from .info import describe, describe_runtime

    for label, value in (describe(path) if path is not None else describe_runtime()).items():
        stdout.print(Text.assemble((f"{label:>15}", "bold"), f"  {value}"), soft_wrap=True)


@app.command()
@reports_errors
def roundtrip(
    image: Annotated[Path, typer.Argument(help="An image to encode and decode in memory.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Side-by-side comparison PNG to write.")] = None,
    quality: QualityOption = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    max_pixels: MaxPixelsOption = None,
    force: ForceOption = False,
) -> None:
    """Encode and decode IMAGE in memory: PSNR, MS-SSIM, bits per pixel, timings, comparison PNG."""
    from .codec import load_codec
    from .evaluation import comparison
    from .evaluation import roundtrip as run_roundtrip
    from .info import human_bytes
    from .paths import COMPARISON_SUFFIX, output_paths, save_image

    target = output_paths([image], output, COMPARISON_SUFFIX, force)[0] if output else None
    result = run_roundtrip(load_codec(model, device, max_pixels), image, quality)
    level = f"quality {result.level}  " if result.level is not None else ""
    stdout.print(
        f"{image}: {level}PSNR {result.psnr:.2f} dB  MS-SSIM {result.ms_ssim:.4f}  "
        f"{result.bpp:.3f} bpp ({human_bytes(result.latent_bytes)})  "
        f"encode {result.encode_ms:.1f} ms  decode {result.decode_ms:.1f} ms "
        "(first calls, with one-time set-up: warm calls are faster, see hybrid-codec eval)",
        soft_wrap=True,
    )
    if target:
        caption = f"{result.psnr:.2f} dB, {result.bpp:.3f} bpp"
        save_image(comparison(result.original, result.decoded, caption), target, overwrite=force)
        stdout.print(f"wrote {target}", soft_wrap=True)


@app.command("eval")
@reports_errors
def eval_(
    folder: Annotated[Path, typer.Argument(help="A folder of images (e.g. CBSD68).")],
    model: ModelOption = None,
    classic: Annotated[
        str, typer.Option(help="Classic codecs to compare with, comma-separated (JPEG, WebP, AVIF; empty: none).")
    ] = "JPEG,WebP,AVIF",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every per-image number to this file.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw PSNR- and MS-SSIM-vs-bpp curves into this PNG.")] = None,
    device: DeviceOption = "auto",
    force: ForceOption = False,
) -> None:
    """Every quality level beside JPEG, WebP and AVIF quality sweeps: bpp, PSNR, MS-SSIM, times, BD-rate."""
    import math

    from rich.table import Table

    from . import rd
    from .codec import load_codec
    from .images import find_images
    from .paths import output_paths

    for path in (json_out, plot):
        if path is not None:
            output_paths([folder], path, path.suffix, force)
    try:
        import bjontegaard  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError:
        fail("eval needs the [eval] extra: pip install 'hybrid-codec[eval]'")
    classics = tuple(name.strip() for name in classic.split(",") if name.strip())
    codec = load_codec(model, device)
    rd.jobs(codec, classics)  # an unknown codec name is one error before any image
    count = len(find_images(folder))  # a missing folder is one line, before the progress bar
    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=count)
        points = rd.evaluate(folder, codec, classics, advance=lambda: progress.advance(task))
    rows = rd.means(points)
    table = Table(title=f"{folder}: {count} images, means (times: medians)")
    for column in ("codec", "setting", "bpp", "PSNR dB", "MS-SSIM", "encode ms", "decode ms"):
        table.add_column(column, justify="left" if column == "codec" else "right")
    for r in rows:
        setting = f"q{r.setting}" if r.codec in rd.CLASSIC else f"level {r.setting}" if r.setting else "8-bit"
        table.add_row(
            r.codec,
            setting,
            f"{r.bpp:.3f}",
            f"{r.psnr:.2f}",
            f"{r.ms_ssim:.4f}",
            f"{r.encode_ms:.1f}",
            f"{r.decode_ms:.1f}",
        )
    stdout.print(table)
    found = rd.deltas(rows, codec.name)
    for d in found:

        def show(value: float, unit: str, digits: int) -> str:
            return f"{value:+.{digits}f}{unit}" if math.isfinite(value) else "n/a (no common range)"

        stdout.print(
            f"{codec.name} vs {d.anchor}: BD-rate {show(d.bd_rate, '%', 1)}  BD-PSNR {show(d.bd_psnr, ' dB', 2)}  "
            f"BD-MS-SSIM {show(d.bd_ms_ssim, '', 4)}",
            soft_wrap=True,
        )
    if json_out:
        rd.write_json(json_out, points, rows, found, overwrite=force)
        stdout.print(f"wrote {json_out}", soft_wrap=True)
    if plot:
        rd.plot(plot, rows, title=f"{folder.name}: {count} images", overwrite=force)
        stdout.print(f"wrote {plot}", soft_wrap=True)


@app.command()
@reports_errors
def demo(
    port: Annotated[int, typer.Option(help="Port of the page.")] = 7860,
    host: Annotated[str, typer.Option(help="Address to bind: 127.0.0.1 keeps the page on this machine.")] = "127.0.0.1",
    model: ModelOption = None,
    device: DeviceOption = "auto",
) -> None:
    """A local web page: drop an image, move the quality slider, compare with JPEG and WebP at the same size."""
    from .demo import serve

    serve(port, model, device, host, ready=lambda url: stdout.print(f"demo at {url} (Ctrl+C stops it)", soft_wrap=True))


@app.command()
@reports_errors
def export(
    model: Annotated[str, typer.Argument(help="Shipped model name (photo, native, sd) or a weights file.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for encoder.onnx, decoder.onnx and runtime.json.")],
    force: ForceOption = False,
) -> None:
    """Export a model to ONNX (dynamic batch and size) with runtime.json: ranges, layouts, levels' steps and tables."""
    from .info import human_bytes
    from .onnx_export import export as export_model
    from .onnx_export import max_difference

    runtime = export_model(model, out, force)
    for name in (runtime["encoder"]["file"], runtime["decoder"]["file"], "runtime.json"):
        stdout.print(f"{out / name} ({human_bytes((out / name).stat().st_size)})", soft_wrap=True)
    stdout.print(f"model {runtime['model']} (weights {runtime['weights']}), opset {runtime['opset']}", soft_wrap=True)
    differences = max_difference(out, model)
    if differences is None:
        stdout.print("onnxruntime is not installed: the graphs were not run", soft_wrap=True)
    else:
        stdout.print(
            f"onnxruntime against PyTorch: encoder within {differences[0]:.1e}, decoder within {differences[1]:.1e}",
            soft_wrap=True,
        )


def recipe_command(options_class: type, model_fields: tuple[str, ...]):
    """A typer command whose flags are the recipe's option fields (declared once, with their help) and
    the model config's `model_fields`; the decorated function takes the built options object."""
    import dataclasses
    import inspect
    import typing

    hints = typing.get_type_hints(options_class)
    config = next(f for f in dataclasses.fields(options_class) if f.name == "model").default_factory()
    config_hints = typing.get_type_hints(type(config))

    def decorate(run):
        parameters = []
        for f in dataclasses.fields(options_class):
            if f.name == "model":
                continue
            required = f.default is dataclasses.MISSING
            declared = option_info(options_class, f.name)
            help_text = declared.get("help", "")
            if declared.get("argument"):
                info = typer.Argument(help=help_text)
            elif hints[f.name] is bool:  # a plain flag: no <bool> value to type after it
                flags = (f"--{f.name.replace('_', '-')}",) + (("-f",) if f.name == "force" else ())
                info = typer.Option(f.default, *flags, help=help_text, metavar="")
            else:
                callback = _device_name if f.name == "device" else None
                info = typer.Option(... if required else f.default, help=help_text, callback=callback)
            parameters.append(
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hints[f.name])
            )
        for name in model_fields:
            if name == "name":  # trained models are named after their file, not all "native"
                info = typer.Option(None, help=MODEL_FIELD_HELP[name], show_default="--out's file name")
                annotation = str | None
            else:
                info = typer.Option(getattr(config, name), help=MODEL_FIELD_HELP[name])
                annotation = config_hints[name]
            parameters.append(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)
            )

        @functools.wraps(run)
        def command(**values):
            if values.get("name", "") is None:
                values["name"] = model_name_for(values["out"])
            model = dataclasses.replace(config, **{name: values.pop(name) for name in model_fields})
            return run(options_class(**values, model=model))

        command.__signature__ = inspect.Signature(parameters)
        del command.__wrapped__  # typer reads the signature above, not run's
        return command

    return decorate


def _log(message: str) -> None:
    err.print(Text(message, style="yellow"), soft_wrap=True)


def resume_command(argv: list[str], checkpoint: Path) -> str:
    """The command line that goes on from `checkpoint`: this one, without --force or an old --resume."""
    import shlex

    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--force", "-f") or arg.startswith("--resume="):
            continue
        elif arg == "--resume":
            skip = True
        else:
            kept.append(arg)
    return shlex.join(["hybrid-codec", *kept, "--resume", str(checkpoint)])


def run_recipe(job, opts, description: str):
    """Run a training job under a progress bar; Ctrl-C says which checkpoint holds how much, and how to go on."""
    from .training import Interrupted

    try:
        with step_progress(description) as report:
            return job(opts, report=report, log=_log)
    except Interrupted as stop:
        if stop.checkpoint is None:
            fail(str(stop))
        fail(
            f"interrupted at step {stop.step}; the checkpoint {stop.checkpoint} holds step {stop.saved_step} "
            f"of {opts.steps}. Resume with: {resume_command(sys.argv[1:], stop.checkpoint)}"
        )


@app.command()
@reports_errors
@recipe_command(TrainOptions, ("name", "family", "encoder_hidden", "decoder_hidden", "decoder_kernel"))
def train(opts) -> None:
    """Train encoder and decoder together on random crops of every image in DATA_DIR."""
    from .train import train as run_training

    result = run_recipe(run_training, opts, "training")
    best = f", best validation PSNR {result.best_val_psnr:.2f} dB" if result.best_val_psnr is not None else ""
    stdout.print(
        f"trained {result.steps} steps in {result.seconds / 60:.1f} min{best}: wrote {result.out} "
        f"(its checkpoint {result.checkpoint} stays: --resume it with a higher --steps to go on, or delete it)",
        soft_wrap=True,
    )


@app.command()
@reports_errors
@recipe_command(DistillOptions, ("encoder_hidden", "decoder_hidden"))
def distill(opts) -> None:
    """Distill the SD-space `sd` model: its encoder learns the SD VAE's latents, its decoder decodes them."""
    from .distill import distill as run_distill
    from .distill import relative_error_report

    result = run_recipe(run_distill, opts, "distilling")
    state = "" if result.finished else " (stopped early: --resume goes on)"
    stdout.print(
        f"distilled {result.steps} steps in {result.seconds / 60:.1f} min{state}, "
        f"{relative_error_report(result.val)}: wrote {result.out}",
        soft_wrap=True,
    )


@app.command("sd-latents")
@reports_errors
def sd_latents(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="A .safetensors file, or a folder for one .npy per image.")],
    scaled: Annotated[
        bool,
        typer.Option("--scaled/--raw", help="Scaled by 0.18215 (the UNet's space), or raw VAE latents.", metavar=""),
    ] = True,
    batch_size: Annotated[int, typer.Option(help="Images per batch through the encoder.")] = 8,
    model: Annotated[str, typer.Option("--model", "-m", help="SD-space model: sd, or a weights file.")] = "sd",
    device: DeviceOption = "auto",
    restart: Annotated[
        bool, typer.Option("--restart", help="Drop what an earlier run wrote and start over.", metavar="")
    ] = False,
) -> None:
    """Precompute SD latents for every image in FOLDER (resumable: a second run skips what is done).
    Under torchrun, OUT is a folder: one shard file per rank and a manifest."""
    from .sd_dataset import write_sd_latents

    progress = progress_bar()
    tasks = []

    def bar(done: int, total: int) -> None:  # the bar appears once the inputs and settings are checked
        if not tasks:
            progress.start()
            tasks.append(progress.add_task("sd-latents", total=total))
        progress.update(tasks[0], completed=done, total=total)

    try:
        job = write_sd_latents(
            folder, out, scaled=scaled, batch_size=batch_size, device=device, model=model, restart=restart, progress=bar
        )
    finally:
        progress.stop()
    for _source, message in job.failed:
        error_line(message)
    skipped = f", {job.skipped} already there" if job.skipped else ""
    stdout.print(f"wrote {job.done} latents to {job.out}{skipped}", soft_wrap=True)
    if job.manifest is not None:
        stdout.print(f"wrote {job.manifest} (every image's shard and key)", soft_wrap=True)
    if job.failed:
        fail(f"{len(job.failed)} of {job.done + job.skipped + len(job.failed)} images failed")


def step_progress(description: str):
    """A rich progress bar fed by (step, total, metrics) reports; plain log lines when not a terminal."""
    import contextlib

    from rich.progress import TextColumn

    @contextlib.contextmanager
    def manager():
        last_val: dict[str, float] = {}
        progress = progress_bar(TextColumn("{task.fields[metrics]}"), refresh_per_second=2)
        task = progress.add_task(description, total=None, metrics="")
        interactive = err.is_terminal

        def report(step: int, total: int, metrics: dict) -> None:
            last_val.update({k: v for k, v in metrics.items() if k.startswith("val")})
            shown = {**{k: v for k, v in metrics.items() if not k.startswith("val")}, **last_val}
            text = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
            progress.update(task, completed=step, total=total, metrics=text)
            if not interactive and (step % 50 == 0 or step == total or "val_psnr" in metrics):
                err.print(f"{description} step {step}/{total}  {text}", soft_wrap=True)

        with progress if interactive else contextlib.nullcontext():
            yield report

    return manager()


def _terminated(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C: every `finally` runs (a temporary file is removed, training says how to resume)."""
    raise KeyboardInterrupt


def main() -> None:
    import signal

    from .runtime import keep_freed_memory

    keep_freed_memory()
    signal.signal(signal.SIGTERM, _terminated)
    app()


if __name__ == "__main__":
    sys.exit(main())
