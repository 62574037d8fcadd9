"""Where outputs go and how every file is written: never over an existing file without `force`,
never half-written (a temporary file beside the target, then a link or rename), nothing left
behind when it fails (its temporary file, the folders it made)."""

from __future__ import annotations

import errno
import io
import os
import stat
import tempfile
from pathlib import Path

from PIL import Image

from .errors import CodecError
from .images import find_images
from .inputs import os_reason

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
        if is_dir(path):
            if suffixes is None:  # encoding a folder again must not encode its own decoded outputs
                below = [p for p in find_images(path) if not p.name.endswith(OWN_OUTPUTS)]
            else:
                below = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
            if not below:
                what = "images" if suffixes is None else " or ".join(suffixes) + " files"
                raise CodecError(f"{path}: folder holds no {what}")
            found.extend(below)
        elif lookup(path) is None:
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

    if output is not None and len(inputs) == 1 and not is_dir(output) and output.suffix:
        if file_suffixes and not output.name.endswith(file_suffixes):
            raise CodecError(f"{output}: the output file must end in {' or '.join(file_suffixes)}")
        targets = [output]
    elif output is not None:
        there = lookup(output) is not None
        if there and not is_dir(output) or not there and looks_like_a_file(output):
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
        existing = [t for t in targets if lookup(t) is not None]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise CodecError(f"{existing[0]} exists{more}; use --force to overwrite")
    for target in targets:
        check_writable(target)
    return targets


def lookup(path: Path) -> os.stat_result | None:
    """What is at `path`, not following a final symlink (a dangling one is there); None where nothing is.
    An unusable name (too long, a loop) is one CodecError, where Path.exists would raise or hide it."""
    try:
        return os.lstat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise CodecError(f"{path}: {os_reason(exc)}") from None


def is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return False
        raise CodecError(f"{path}: {os_reason(exc)}") from None


def check_writable(target: Path) -> None:
    """Refuse a target that cannot be written, before any work: its name is too long, its nearest
    existing ancestor is a file, or that folder is not writable. Folders are made only when written."""
    folder = nearest_existing(target.parent)
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in target.parts:
        if len(os.fsencode(part)) > limit:
            raise CodecError(f"{target}: file name too long (at most {limit} bytes a name)")
    if not is_dir(folder):
        raise CodecError(f"{target}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CodecError(f"{target}: cannot write in {folder} (permission denied)")


def nearest_existing(folder: Path) -> Path:
    """`folder`, or its nearest ancestor that exists."""
    while lookup(folder) is None and folder != folder.parent:
        folder = folder.parent
    return folder


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's files are 0600


def write_atomic(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    """Write `data` to a temporary file beside `path`, then publish it whole.

    Without `overwrite`, publishing is a hard link, which fails if anything is at `path` (a file
    written meanwhile by another process, a dangling symlink): no check-then-write race. Folders
    missing above `path` are made, and removed again if the write fails; the temporary file is
    removed in every case, Ctrl-C and SIGTERM included (the CLI turns SIGTERM into an exception).
    """
    path = Path(path)
    created: list[Path] = []
    tmp: Path | None = None
    done = False
    try:
        created = make_folders(path.parent)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:80]}.", suffix=".tmp")
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
        if overwrite:
            os.replace(tmp, path)
        else:
            publish_new(tmp, path)
        done = True
    except FileExistsError:
        raise CodecError(f"{path} exists; use --force to overwrite") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CodecError(f"{path}: cannot write (no space left on device)") from None
        raise CodecError(f"{path}: cannot write ({os_reason(exc)})") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if not done:
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    pass


def publish_new(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` only if nothing is there, atomically (a hard link; where the file
    system has none, a rename after a check)."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
            raise
        if lookup(path) is not None:
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
        os.rename(tmp, path)


def make_folders(folder: Path) -> list[Path]:
    """Make `folder` and the missing folders above it; the ones made, outermost first."""
    missing = []
    while lookup(folder) is None and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    try:
        for each in reversed(missing):
            each.mkdir()
            made.append(each)
    except OSError:
        for each in reversed(made):
            each.rmdir()
        raise
    return made


def save_image(image: Image.Image, target: Path, overwrite: bool = True) -> None:
    buffer = io.BytesIO()
    fmt = Image.registered_extensions().get(target.suffix.lower())
    if fmt is None:
        raise CodecError(f"{target}: unknown image extension (use .png, .jpg, .webp, ...)")
    image.save(buffer, format=fmt)
    write_atomic(target, buffer.getvalue(), overwrite)
