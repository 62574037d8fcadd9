"""`hybrid-codec sd-latents`: SD latents for a whole image folder, for diffusion-training pipelines.

Two outputs: one `.safetensors` file (a tensor (4, h, w) per image, keyed by its path relative to
the folder, settings in the metadata), or a folder of `<relative path without suffix>.npy` files
with a `sd-latents.json` manifest. Both resume: images whose latents exist are skipped. For the
single file, finished latents are kept in a hidden `.<name>.parts/` folder until the file is written.
Under torchrun each rank writes its own shard of single files, and rank 0 a manifest of them
(`write_shards`): `torchrun --nproc_per_node N -m hybrid_codec.sd_latents DIR --out OUT`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import CodecError, first_line
from .images import find_images, open_image, pixels_to_tensor, quiet_stderr
from .inputs import load_json, open_input, read_input
from .paths import write_atomic
from .sd import SD_SCALING_FACTOR, encode_latents, sd_codec
from .training import Distributed

MANIFEST = "sd-latents.json"
SHARD_MANIFEST = "manifest.json"  # a torchrun run's: image -> shard and key
FORMAT = "hybrid-codec-sd-latents"

Progress = Callable[[int, int], None]
"""Called with (done, total) as images finish."""


@dataclass
class LatentsJob:
    done: int = 0  # latents written by this run
    skipped: int = 0  # already there (resume)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    out: Path | None = None
    manifest: Path | None = None  # written by rank 0 of a torchrun run


def _settings(model: str, scaled: bool, device: str) -> dict[str, str]:
    codec = sd_codec(model, device)
    return {
        "format": FORMAT,
        "model": codec.name,
        "weights": codec.weights_hash,
        "scaled": "true" if scaled else "false",
        "scaling_factor": repr(SD_SCALING_FACTOR) if scaled else "1.0",
    }


def _npy_name(key: str) -> str:
    return str(Path(key).with_suffix(".npy"))


class _NpyFolder:
    """A folder of one .npy per image plus a manifest naming the settings; resumable."""

    def __init__(self, folder: Path, settings: dict[str, str]) -> None:
        self.folder = folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CodecError(f"{folder}: cannot create folder ({exc.strerror})") from None
        manifest = folder / MANIFEST
        if manifest.exists():
            try:
                old = load_json(read_input(manifest, "manifest"), str(manifest))
            except CodecError as exc:
                raise CodecError(f"{exc}; delete it or write to another folder") from None
            if old != settings:
                raise CodecError(
                    f"{folder} holds latents made with other settings ({_differences(old, settings)}); "
                    "use --restart to start over or write to another folder"
                )
        else:
            write_atomic(manifest, json.dumps(settings, indent=1, sort_keys=True).encode())

    def has(self, key: str) -> bool:
        """Whether `key`'s latent is done; a part whose header is damaged is an error now, before any image
        is encoded (its data is read, and checked, when the file is assembled)."""
        path = self.folder / _npy_name(key)
        if not path.is_file():
            return False
        check_part_header(path)
        return True

    def put(self, key: str, latent: torch.Tensor) -> None:
        path = self.folder / _npy_name(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = _npy_bytes(latent)
        write_atomic(path, buffer)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in sorted(self.folder.rglob("*.npy")):
            yield path.relative_to(self.folder).as_posix(), torch.from_numpy(read_part(path))


def _damaged(path: Path, exc: Exception) -> CodecError:
    return CodecError(f"{path}: a damaged latent part ({first_line(exc)}); use --restart")


def check_part_header(path: Path) -> None:
    """A part's .npy header says (4, h, w) float32 and its size fits: without reading the data."""
    try:
        with open_input(path, "latent part") as f:
            version = np.lib.format.read_magic(f)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in header:
                raise ValueError(f".npy format {version}, not what numpy.save writes")
            shape, fortran, dtype = header[version](f)  # a bounded header: numpy refuses one over 10,000 bytes
            data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, EOFError, OSError... for damaged headers
        raise _damaged(path, exc) from None
    if dtype != np.float32 or len(shape) != 3 or shape[0] != 4 or fortran:
        raise CodecError(f"{path}: not a (4, h, w) float32 latent part ({dtype} {list(shape)}); use --restart")
    if data_bytes != 4 * shape[0] * shape[1] * shape[2]:
        raise CodecError(f"{path}: a truncated latent part ({data_bytes} data bytes for {list(shape)}); use --restart")


def read_part(path: Path) -> np.ndarray:
    """One finished latent: its header checked first (never a pickle), then its values (finite)."""
    import io

    check_part_header(path)
    try:
        array = np.load(io.BytesIO(read_input(path, "latent part")), allow_pickle=False)
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, EOFError, OSError... for damaged files
        raise _damaged(path, exc) from None
    if not np.isfinite(array).all():
        raise CodecError(f"{path}: a latent part holding NaN or infinite values; use --restart")
    return array


def _npy_bytes(latent: torch.Tensor) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, latent.detach().cpu().float().numpy(), allow_pickle=False)
    return buffer.getvalue()


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} vs {new.get(k)!r}" for k in keys)


def _read_safetensors(path: Path, settings: dict[str, str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CodecError(f"{path}: exists but is not a readable safetensors file ({exc}); use --restart") from None
    old = {k: metadata.get(k) for k in settings}
    if old != settings:
        raise CodecError(
            f"{path} holds latents made with other settings ({_differences(old, settings)}); "
            "use --restart to start over or write to another file"
        )
    return tensors


def write_sd_latents(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    scaled: bool = True,
    batch_size: int = 8,
    device: str = "auto",
    model: str = "sd",
    restart: bool = False,
    progress: Progress | None = None,
) -> LatentsJob:
    """SD latents for every image below `folder` into `out` (.safetensors file, or a folder of .npy).

    Images of one size are encoded together, in batches of `batch_size`; a file that cannot be
    read is reported in `failed` and the others go on. Runs again skip what is done; `restart`
    drops it first. Under torchrun (WORLD_SIZE > 1) `out` is a folder of shards: see `write_shards`.
    """
    if type(batch_size) is not int or batch_size < 1:  # before any folder or file is made
        raise CodecError(f"--batch-size must be at least 1, not {batch_size!r}")
    folder, out = Path(folder), Path(out)
    keys, sources = _find(folder)
    dist = Distributed()
    if dist.world > 1:
        return write_shards(keys, sources, out, dist, scaled, batch_size, device, model, restart, progress)
    settings = _settings(model, scaled, device)
    single = out.suffix == ".safetensors"
    if single and out.is_dir():
        raise CodecError(f"{out}: is a folder; give a .safetensors file or a folder without that suffix")
    if not single and out.exists() and not out.is_dir():
        raise CodecError(f"{out}: exists and is a file; give a .safetensors file or a folder")
    if not single and (out / SHARD_MANIFEST).exists():
        raise CodecError(f"{out}: holds the shards of a torchrun run; run it under torchrun, or use another folder")
    return _write(keys, sources, out, settings, scaled, batch_size, device, model, restart, progress)


def _find(folder: Path) -> tuple[list[str], list[Path]]:
    sources = find_images(folder)
    if not sources:
        raise CodecError(f"{folder}: folder holds no images")
    keys = [path.relative_to(folder).as_posix() for path in sources]
    names = [_npy_name(key) for key in keys]
    if len(set(names)) != len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise CodecError(f"two images would share the latent {clash!r} (same name, other suffix); rename one")
    return keys, sources


def _size(path: Path) -> tuple[int, int]:
    """An image's size from its header, without decoding it; (0, 0) where it cannot be read (reported later)."""
    try:
        with quiet_stderr(), open_input(path, "image") as file, Image.open(file) as image:
            return image.size
    except Exception:  # noqa: BLE001 - any unreadable file is reported by open_image, with its reason
        return (0, 0)


def _write(
    keys: list[str],
    sources: list[Path],
    out: Path,
    settings: dict[str, str],
    scaled: bool,
    batch_size: int,
    device: str,
    model: str,
    restart: bool,
    progress: Progress | None,
) -> LatentsJob:
    """The latents of `sources` (named `keys`) into one .safetensors file or .npy folder, resumably."""
    single = out.suffix == ".safetensors"
    parts_dir = out.with_name(f".{out.name}.parts") if single else out
    if restart:
        if single:
            out.unlink(missing_ok=True)
        shutil.rmtree(parts_dir, ignore_errors=True)
    existing = _read_safetensors(out, settings) if single and out.exists() else {}
    parts = _NpyFolder(parts_dir, settings)

    job = LatentsJob(out=out)
    pending = []
    for key, source in zip(keys, sources, strict=True):
        if key in existing or parts.has(key):
            job.skipped += 1
        else:
            pending.append((key, source))
    pending.sort(key=lambda item: (_size(item[1]), item[0]))  # images of one size together, in batches
    total = len(sources)
    if progress:
        progress(job.skipped, total)

    batch: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        latents = encode_latents(
            [image for _, image in batch],
            scaled=scaled,
            batch_size=batch_size,
            device=device,
            model=model,
        )
        for (key, _), latent in zip(batch, latents, strict=True):
            parts.put(key, latent)
            job.done += 1
        if progress:
            progress(job.skipped + job.done + len(job.failed), total)
        batch.clear()

    for key, source in pending:
        try:
            image = pixels_to_tensor(np.asarray(open_image(source)))
        except CodecError as exc:
            job.failed.append((source, str(exc)))
            if progress:
                progress(job.skipped + job.done + len(job.failed), total)
            continue
        if batch and (batch[0][1].shape != image.shape or len(batch) >= batch_size):
            flush()
        batch.append((key, image))
    flush()

    if single:
        _assemble(out, existing, parts, settings, keys)
    return job


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def write_shards(
    keys: list[str],
    sources: list[Path],
    out: Path,
    dist: Distributed,
    scaled: bool = True,
    batch_size: int = 8,
    device: str = "auto",
    model: str = "sd",
    restart: bool = False,
    progress: Progress | None = None,
) -> LatentsJob:
    """One rank's part of a torchrun run: `out` is a folder; rank r of N takes every N-th image
    (sorted by size, then name: each rank gets its share of every size) into its own resumable
    `shard-r-of-N.safetensors`, and rank 0, once every shard is complete, writes `manifest.json`
    (image -> shard and key). A killed run resumes where each rank stopped, with the same N."""
    if out.suffix == ".safetensors":
        raise CodecError(f"{out}: under torchrun --out is a folder, for one shard file per rank")
    if out.exists() and not out.is_dir():
        raise CodecError(f"{out}: exists and is a file; under torchrun --out is a folder")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{dist.local_rank}"  # one GPU per rank
        torch.cuda.set_device(dist.local_rank)
    dist.init(torch.device(device if device != "auto" else "cpu"))
    try:
        if restart and dist.main:  # what runs wrote, and nothing else of the folder
            (out / SHARD_MANIFEST).unlink(missing_ok=True)
            for shard in out.glob("shard-*-of-*.safetensors"):
                shard.unlink()
            for parts in out.glob(".shard-*-of-*.safetensors.parts"):
                shutil.rmtree(parts, ignore_errors=True)
        dist.barrier()  # nobody writes while rank 0 clears the folder
        settings = _settings(model, scaled, device)
        others = sorted(
            p.name for p in out.glob("shard-*-of-*.safetensors") if not p.name.endswith(f"{dist.world:05d}.safetensors")
        )
        if others:
            raise CodecError(
                f"{out} holds shards of a run with another number of ranks ({others[0]}); "
                "rerun with that many, or use --restart to start over"
            )
        order = sorted(range(len(keys)), key=lambda i: (_size(sources[i]), keys[i]))
        mine = order[dist.rank :: dist.world]
        shard = out / shard_name(dist.rank, dist.world)
        out.mkdir(parents=True, exist_ok=True)
        job = _write(
            [keys[i] for i in mine],
            [sources[i] for i in mine],
            shard,
            settings,
            scaled,
            batch_size,
            device,
            model,
            False,
            progress if dist.main else None,
        )
        dist.barrier()  # every shard is complete from here on
        if dist.main:
            job.manifest = out / SHARD_MANIFEST
            write_atomic(job.manifest, json.dumps(_manifest(out, dist.world, settings), indent=1).encode())
        dist.barrier()
        return job
    finally:
        dist.close()


def _manifest(out: Path, world: int, settings: dict[str, str]) -> dict:
    """Which shard holds each image's latent, read back from the shards themselves."""
    from safetensors import safe_open

    images = {}
    for rank in range(world):
        name = shard_name(rank, world)
        with safe_open(str(out / name), framework="pt") as f:
            images.update({key: {"shard": name, "key": key} for key in f.keys()})
    return {
        **settings,
        "world": world,
        "shards": [shard_name(r, world) for r in range(world)],
        "images": dict(sorted(images.items())),
    }


def _assemble(
    out: Path, existing: dict[str, torch.Tensor], parts: _NpyFolder, settings: dict[str, str], keys: list[str]
) -> None:
    """Write the single file from what it held plus the finished parts, atomically; then drop the parts."""
    from safetensors.torch import save

    npy_to_key = {_npy_name(key): key for key in keys}
    tensors = dict(existing)
    for name, tensor in parts.items():
        tensors[npy_to_key.get(Path(name).as_posix(), name)] = tensor
    write_atomic(out, save({k: v.contiguous() for k, v in sorted(tensors.items())}, metadata=settings))
    shutil.rmtree(parts.folder, ignore_errors=True)
