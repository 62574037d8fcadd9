"""Where outputs go and how every file is written: never over an existing file without `force`,
never half-written (a temporary file beside the target, then a rename)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from .errors import CodecError
from .images import find_images

LATENT_SUFFIX = ".hyb"  # the compact file; a target ending in .pt gets the torch.save dict instead
PT_SUFFIX = ".latent.pt"
LATENT_SUFFIXES = (LATENT_SUFFIX, PT_SUFFIX)
DECODED_SUFFIX = ".decoded.png"
COMPARISON_SUFFIX = ".comparison.png"
OWN_OUTPUTS = (DECODED_SUFFIX, COMPARISON_SUFFIX)  # what this tool writes beside images: not new inputs


def expand_inputs(inputs: list[Path], suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Files as given, folders replaced by the matching files below them (images, or files ending in a suffix)."""
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            if suffixes is None:  # encoding a folder again must not encode its own decoded outputs
                below = [p for p in find_images(path) if not p.name.endswith(OWN_OUTPUTS)]
            else:
                below = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
            if not below:
                what = "images" if suffixes is None else " or ".join(suffixes) + " files"
                raise CodecError(f"{path}: folder holds no {what}")
            found.extend(below)
        elif not path.exists():
            raise CodecError(f"{path}: no such file")
        else:
            found.append(path)
    return found


def looks_like_a_file(path: Path) -> bool:
    """A name that a user means as a file (a latent, weights, an image), not as a folder to create."""
    name = path.name.lower()
    return name.endswith((*LATENT_SUFFIXES, ".pt", ".safetensors", ".json")) or (
        path.suffix.lower() in Image.registered_extensions()
    )


def output_paths(
    inputs: list[Path],
    output: Path | None,
    suffix: str,
    force: bool,
    file_suffixes: tuple[str, ...] | None = None,
) -> list[Path]:
    """Where each input's output goes; refuses to overwrite anything unless `force`.

    No -o: beside the input. One input and -o not an existing folder: -o itself (a file), which must
    end in one of `file_suffixes` where given. Otherwise -o is a folder (created if needed), and a
    name like a file's is refused rather than made a folder.
    """

    def stem(path: Path) -> str:
        name = path.name
        for suffix in LATENT_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return path.stem

    if output is not None and len(inputs) == 1 and not output.is_dir() and output.suffix:
        if file_suffixes and not output.name.endswith(file_suffixes):
            raise CodecError(f"{output}: the output file must end in {' or '.join(file_suffixes)}")
        targets = [output]
    elif output is not None:
        if output.exists() and not output.is_dir() or not output.exists() and looks_like_a_file(output):
            raise CodecError(f"{output}: {len(inputs)} inputs need a folder for -o, not a file name")
        targets = [output / f"{stem(p)}{suffix}" for p in inputs]
    else:
        targets = [p.with_name(f"{stem(p)}{suffix}") for p in inputs]
    first: dict[Path, Path] = {}
    for source, target in zip(inputs, targets, strict=True):
        if target in first:
            raise CodecError(
                f"{first[target]} and {source} would both write {target}; use separate folders or -o for one"
            )
        first[target] = source
    if not force:
        existing = [t for t in targets if t.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise CodecError(f"{existing[0]} exists{more}; use --force to overwrite")
    for target in targets:
        if not target.parent.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CodecError(f"{target.parent}: cannot create folder ({exc.strerror})") from None
    return targets


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written output."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise CodecError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:  # also on Ctrl-C
        tmp.unlink(missing_ok=True)


def save_image(image: Image.Image, target: Path) -> None:
    buffer = io.BytesIO()
    fmt = Image.registered_extensions().get(target.suffix.lower())
    if fmt is None:
        raise CodecError(f"{target}: unknown image extension (use .png, .jpg, .webp, ...)")
    image.save(buffer, format=fmt)
    write_atomic(target, buffer.getvalue())
