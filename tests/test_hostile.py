"""Hostile inputs and failing disks: every bad path through the CLI and the API fails as one line
(a CodecError in the API), exits non-zero, leaves nothing behind and never hangs."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, smooth_image
from PIL import Image
from typer.testing import CliRunner

from hybrid_codec import paths as paths_module
from hybrid_codec.bitstream import Latent
from hybrid_codec.cli import app, one_line
from hybrid_codec.codec import Codec, load_codec
from hybrid_codec.config import CodecConfig
from hybrid_codec.errors import CodecError
from hybrid_codec.images import open_image
from hybrid_codec.inputs import json_depth, load_json
from hybrid_codec.models import Autoencoder
from hybrid_codec.paths import write_atomic

ROOT = Path(__file__).resolve().parent.parent
TINY_SD = CodecConfig(name="tinysd", latent_space="sd", encoder_hidden=4, decoder_hidden=4)


def listing(folder: Path) -> dict[str, object]:
    """Every entry below `folder` (hidden ones, folders and links too); regular files with their bytes."""
    found: dict[str, object] = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(top) / name
            info = os.lstat(path)
            key = str(path.relative_to(folder))
            if os.path.islink(path):
                found[key] = ("link", os.readlink(path))
            elif path.is_file() and not path.is_fifo():
                found[key] = path.read_bytes()
            else:
                found[key] = ("dir" if path.is_dir() else "special", info.st_mode)
    return found


def refused(work: Path, *args: object, match: str, code: int = 1, logs: bool = False) -> str:
    """The command exits `code` with one line on stderr matching `match`, no traceback, and `work` unchanged.
    With `logs`, other lines (training's log, a progress bar) may come before it; the error is still one line."""
    before = listing(work)
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    if logs:
        lines = [line for line in lines if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and re.search(match, lines[0]), lines[0]
    assert "Traceback" not in result.output
    assert listing(work) == before, "files were left behind or changed"
    return lines[0]


def succeeds(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with the tiny weights, an image, its latent file, and tiny SD-space weights."""
    work = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    Autoencoder(TINY).save_pretrained(work / "tiny.safetensors")
    Autoencoder(TINY_SD).save_pretrained(work / "tinysd.safetensors")
    Image.fromarray(smooth_image(24, 40)).save(work / "a.png")
    codec = load_codec(work / "tiny.safetensors", "cpu")
    codec.encode(work / "a.png").save(work / "a.latent.pt")
    return work


@pytest.fixture
def codec(work) -> Codec:
    return load_codec(work / "tiny.safetensors", "cpu")


@pytest.fixture
def scratch(work):
    """A folder inside `work` for one test's extra files, removed afterwards."""
    folder = work / "scratch"
    folder.mkdir()
    yield folder
    for top, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            os.unlink(Path(top) / name)
        for name in dirs:
            (Path(top) / name).rmdir() if not os.path.islink(Path(top) / name) else os.unlink(Path(top) / name)
    folder.rmdir()


def weights_with(path: Path, metadata: dict[str, str], tensors: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(tensors or {"x": torch.zeros(1)}, str(path), metadata=metadata)
    return path


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---- paths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["encode", "decode", "info", "roundtrip"])
def test_a_named_pipe_is_refused_not_waited_on(work, scratch, command):
    fifo = scratch / ("pipe.latent.pt" if command in ("decode", "info") else "pipe.png")
    os.mkfifo(fifo)
    model = () if command == "info" else ("-m", work / "tiny.safetensors")
    refused(work, command, fifo, *model, match="not a regular file")


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_a_device_file_is_refused(work, command):
    target = work / ("x.latent.pt" if command == "encode" else "x.png")
    refused(work, command, "/dev/zero", "-m", work / "tiny.safetensors", "-o", target, match="regular file")


def test_an_input_name_over_the_limit(work):
    refused(work, "encode", work / ("n" * 300 + ".png"), "-m", work / "tiny.safetensors", match="too long")


def test_an_output_name_over_the_limit(work):
    target = work / ("n" * 300 + ".latent.pt")
    refused(work, "encode", work / "a.png", "-m", work / "tiny.safetensors", "-o", target, match="too long")


def test_an_output_whose_parent_is_a_file(work):
    target = work / "a.png" / "x.latent.pt"
    refused(work, "encode", work / "a.png", "-m", work / "tiny.safetensors", "-o", target, match="is a file")


def test_an_output_below_a_file_several_levels_down(work):
    target = work / "a.png" / "b" / "c" / "x.decoded.png"
    refused(work, "decode", work / "a.latent.pt", "-m", work / "tiny.safetensors", "-o", target, match="is a file")


def test_a_folder_without_write_permission(work, scratch, monkeypatch):
    locked = scratch / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
    target = locked / "x.latent.pt"
    refused(work, "encode", work / "a.png", "-m", work / "tiny.safetensors", "-o", target, match="permission denied")


def test_an_unreadable_input(work, scratch, monkeypatch):
    secret = scratch / "secret.png"
    secret.write_bytes((work / "a.png").read_bytes())
    real = os.open

    def deny(path, flags, *args, **kwargs):
        if Path(os.fsdecode(path)) == secret:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    refused(work, "encode", secret, "-m", work / "tiny.safetensors", "-o", scratch / "s.latent.pt", match="Permission")


@pytest.mark.parametrize("name", ["odd[/]name.png", "[draft] photo.png", "[bold red]x[/].png"])
def test_markup_in_a_path_is_printed_as_it_is(work, name):
    line = refused(work, "encode", work / name, "-m", work / "tiny.safetensors", match="no such file")
    assert name in line


def test_markup_in_a_path_that_works_is_printed_as_it_is(work, scratch):
    source = scratch / "odd[/]name [draft].png"  # a folder "odd[" and a file "]name [draft].png"
    source.parent.mkdir()
    source.write_bytes((work / "a.png").read_bytes())
    out = succeeds("encode", source, "-m", work / "tiny.safetensors", "-o", scratch / "[b]x.latent.pt")
    assert f"{source} -> {scratch / '[b]x.latent.pt'}" in out
    assert "model  tiny" in succeeds("info", scratch / "[b]x.latent.pt")


def test_markup_in_a_bad_option_value_is_printed_as_it_is(work):
    line = refused(work, "encode", work / "a.png", "--device", "[red]x[/]", match="device")
    assert "[red]x[/]" in line
    refused(work, "encode", work / "a.png", "-q", "[red]x[/]", match="Invalid value for '--quality'", code=2)


def test_a_dangling_symlink_output_is_not_written_through(work, scratch):
    link = scratch / "x.latent.pt"
    link.symlink_to(scratch / "elsewhere.latent.pt")
    refused(work, "encode", work / "a.png", "-m", work / "tiny.safetensors", "-o", link, match="exists")


def test_an_existing_output_is_kept_without_force(work):
    refused(work, "decode", work / "a.latent.pt", "-m", work / "tiny.safetensors", "-o", work / "a.png", match="exists")


def test_a_missing_input_among_options(work):
    refused(work, "roundtrip", work / "none.png", "-m", work / "tiny.safetensors", match="no such file")


def test_a_folder_without_images(work, scratch):
    refused(work, "encode", scratch, "-m", work / "tiny.safetensors", match="holds no images")


def test_a_folder_given_as_a_weights_file(work, scratch):
    refused(work, "encode", work / "a.png", "-m", scratch, match="neither a shipped model|is a folder")


def test_an_unknown_option_is_one_line(work):
    refused(work, "encode", work / "a.png", "--no-such-option", match="No such option", code=2)


def test_a_missing_argument_is_one_line(work):
    refused(work, "decode", match="Missing argument", code=2)


def fail_writes(monkeypatch, code: int = errno.ENOSPC):
    """Every file write in the package fails as a full disk does, after half the bytes."""
    real = os.fdopen

    class Full(io.FileIO):
        def write(self, data):
            super().write(bytes(data)[: len(data) // 2])
            raise OSError(code, os.strerror(code))

    def fdopen(fd, mode="r", *args, **kwargs):
        return Full(fd, "wb") if "w" in mode else real(fd, mode, *args, **kwargs)

    monkeypatch.setattr(paths_module.os, "fdopen", fdopen)


@pytest.mark.parametrize("target", ["x.latent.pt", "new/sub/x.latent.pt"])
def test_a_full_disk_while_encoding(work, monkeypatch, target):
    fail_writes(monkeypatch)
    refused(work, "encode", work / "a.png", "-m", work / "tiny.safetensors", "-o", work / target, match="no space left")


def test_a_full_disk_while_decoding(work, monkeypatch):
    fail_writes(monkeypatch)
    target = work / "deep" / "er" / "a.png"
    refused(work, "decode", work / "a.latent.pt", "-m", work / "tiny.safetensors", "-o", target, match="no space left")


def test_a_read_only_file_system_while_writing(work, monkeypatch):
    fail_writes(monkeypatch, errno.EROFS)
    refused(
        work, "encode", work / "a.png", "-m", work / "tiny.safetensors", "-o", work / "y.latent.pt", match="Read-only"
    )


def test_a_failed_encode_leaves_no_folders(work, scratch):
    (scratch / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    target = scratch / "new" / "sub" / "x.latent.pt"
    refused(work, "encode", scratch / "bad.png", "-m", work / "tiny.safetensors", "-o", target, match="bad.png")


# ---- weights files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (nested(5000), "nested deeper"),
        ('{"latent_channels": 1000000}', "at most 64"),
        ('{"encoder_hidden": 100000000000}', "at most 512"),
        ('{"downscale": 32, "encoder_hidden": 512, "decoder_hidden": 512}', "weights \\(at most"),
        ('{"decoder_kernel": 15, "latent_channels": 64, "decoder_hidden": 512}', "weights \\(at most"),
        ('{"name": "x", "encoder_hidden": NaN}', "invalid JSON"),
        ('"x" * 3', "invalid JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_a_weights_file_with_a_hostile_config(work, scratch, config, match):
    path = weights_with(scratch / "w.safetensors", {"format": "hybrid-codec-weights", "config": config})
    refused(work, "encode", work / "a.png", "-m", path, "-o", scratch / "x.latent.pt", match=match)
    refused(work, "info", path, match=match)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_weights_holding_nan_or_infinity_are_refused(work, scratch, bad):
    model = Autoencoder(TINY)
    with torch.no_grad():
        model.decoder.conv.kernel_bias[0, 0] = bad
    path = model.save_pretrained(scratch / "nan.safetensors")
    refused(work, "encode", work / "a.png", "-m", path, "-o", scratch / "x.latent.pt", match="NaN or infinite")


@pytest.mark.parametrize(
    "data",
    [b"", b"\x05", b"\xff" * 8 + b"{}", (10).to_bytes(8, "little") + b"{" * 10, (2).to_bytes(8, "little") + b"{}"],
    ids=["empty", "one byte", "huge header size", "bad json", "no metadata"],
)
def test_a_damaged_weights_file(work, scratch, data):
    (scratch / "w.safetensors").write_bytes(data)
    refused(work, "info", scratch / "w.safetensors", match="safetensors|JSON")


def test_a_truncated_weights_file(work, scratch):
    data = (work / "tiny.safetensors").read_bytes()
    (scratch / "w.safetensors").write_bytes(data[: len(data) - 100])
    refused(work, "encode", work / "a.png", "-m", scratch / "w.safetensors", match="not a safetensors weights file")


def test_a_pickle_named_as_weights_runs_nothing(work, scratch):
    marker = scratch / "ran"
    (scratch / "w.safetensors").write_bytes(pickle.dumps(Bomb(marker)))
    refused(work, "info", scratch / "w.safetensors", match="safetensors")
    assert not marker.exists()


class Bomb:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---- checkpoints -----------------------------------------------------------------------------------


def checkpoint_of(scratch: Path, state: object) -> Path:
    path = scratch / "run.ckpt"
    torch.save(state, path)
    return path


def good_state() -> dict:
    return {
        "format": "hybrid-codec-checkpoint",
        "config": TINY.to_json(),
        "options": {},
        "step": 1,
        "seconds": 1.0,
        "model": Autoencoder(TINY).state_dict(),
        "optimizer": {},
        "scheduler": {},
    }


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: [1, 2, 3], "holds a list"),
        (lambda s: {k: v for k, v in s.items() if k != "model"}, "'model' is missing"),
        (lambda s: {**s, "config": nested(3000)}, "nested deeper"),
        (lambda s: {**s, "config": '{"latent_channels": 1000000}'}, "at most 64"),
        (lambda s: {**s, "step": -5}, "step -5"),
        (lambda s: {**s, "step": True}, "'step'"),
        (lambda s: {**s, "model": {"x": 1}}, "dict of tensors"),
        (lambda s: {**s, "options": [1]}, "'options' is not a dict"),
    ],
    ids=["list", "no model", "deep config", "huge config", "negative step", "bool step", "bad model", "bad options"],
)
def test_a_hostile_checkpoint(work, scratch, image_dir, change, match):
    path = checkpoint_of(scratch, change(good_state()))
    refused(work, "info", path, match=match)
    out = scratch / "m.safetensors"
    args = ("train", image_dir, "--out", out, "--resume", path, "--steps", "3", "--encoder-hidden", "4")
    refused(work, *args, "--decoder-hidden", "4", "--name", "tiny", match=match)


def test_a_truncated_checkpoint(work, scratch):
    path = checkpoint_of(scratch, good_state())
    path.write_bytes(path.read_bytes()[:300])
    refused(work, "info", path, match="not a readable training checkpoint")


def test_a_checkpoint_with_a_pickled_class_runs_nothing(work, scratch):
    marker = scratch / "ran"
    path = scratch / "run.ckpt"
    path.write_bytes(pickle.dumps({"format": "x", "model": Bomb(marker)}))
    refused(work, "info", path, match="not a readable training checkpoint")
    assert not marker.exists()


def test_a_checkpoint_whose_weights_do_not_fit(work, scratch, image_dir):
    state = good_state()
    state["model"] = {k: torch.zeros(2, 2) for k in state["model"]}
    state["optimizer"] = {"state": {}, "param_groups": []}
    path = checkpoint_of(scratch, state)
    out = scratch / "m.safetensors"
    args = ("train", image_dir, "--out", out, "--resume", path, "--steps", "3", "--encoder-hidden", "4")
    refused(work, *args, "--decoder-hidden", "4", "--name", "tiny", match="does not fit this run")


@pytest.fixture
def image_dir(scratch) -> Path:
    folder = scratch / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(32, 32, seed=i)).save(folder / f"{i}.png")
    return folder


def test_a_full_disk_while_training(work, scratch, image_dir, monkeypatch):
    fail_writes(monkeypatch)
    out = scratch / "runs" / "m.safetensors"
    args = ("train", image_dir, "--out", out, "--steps", "1", "--crop", "16", "--batch-size", "1")
    refused(
        work,
        *args,
        "--encoder-hidden",
        "4",
        "--decoder-hidden",
        "4",
        "--workers",
        "0",
        match="no space left",
        logs=True,
    )


def test_a_data_loader_worker_error_is_its_message():
    class Failing(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise CodecError("photo.png: corrupt or truncated image")

    loader = torch.utils.data.DataLoader(Failing(), num_workers=1)
    with pytest.raises(CodecError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value)  # what torch passes on
    assert one_line(str(caught.value)) == "photo.png: corrupt or truncated image"


# ---- sd-latents resume state ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("part", "match"),
    [
        (b"garbage", "damaged latent part"),
        (b"\x93NUMPY" + b"\x01\x00" + b"\x10\x00{'descr': '|O'  }", "damaged latent part"),
        ("pickle", "not a \\(4, h, w\\) float32 latent part \\(object"),
        ("truncated", "a truncated latent part"),
        ("shape", "not a \\(4, h, w\\) float32"),
        ("nan", "NaN"),
    ],
)
def test_a_damaged_sd_latents_part(work, scratch, image_dir, part, match):
    out = scratch / "lat.safetensors"
    args = ("sd-latents", image_dir, "--out", out, "-m", work / "tinysd.safetensors", "--device", "cpu")
    parts = scratch / ".lat.safetensors.parts"  # what a killed run leaves: its settings, one good part, one not
    parts.mkdir()
    (parts / "sd-latents.json").write_text(json.dumps(sd_settings(work), indent=1, sort_keys=True))
    good = io.BytesIO()
    np.save(good, np.zeros((4, 4, 4), np.float32))
    (parts / "1.npy").write_bytes(good.getvalue())
    buffer = io.BytesIO()
    if part == "pickle":
        np.save(buffer, np.array([Bomb(scratch / "ran")], dtype=object), allow_pickle=True)
    elif part == "truncated":
        np.save(buffer, np.zeros((4, 4, 4), np.float32))
        buffer = io.BytesIO(buffer.getvalue()[:-10])
    elif part == "shape":
        np.save(buffer, np.zeros((3, 4), np.float32))
    elif part == "nan":
        np.save(buffer, np.full((4, 4, 4), np.nan, np.float32))
    else:
        buffer.write(part)
    (parts / "0.npy").write_bytes(buffer.getvalue())
    refused(work, *args, match=match, logs=True)
    assert not (scratch / "ran").exists()


def sd_settings(work: Path) -> dict:
    from hybrid_codec.sd_dataset import _settings

    return _settings(str(work / "tinysd.safetensors"), True, "cpu")


def test_a_deeply_nested_sd_latents_manifest(work, scratch, image_dir):
    out = scratch / "npy"
    out.mkdir()
    (out / "sd-latents.json").write_text(nested(10000))
    args = ("sd-latents", image_dir, "--out", out, "-m", work / "tinysd.safetensors", "--device", "cpu")
    refused(work, *args, match="nested deeper")


@pytest.mark.parametrize("size", ["0", "-3"])
def test_sd_latents_batch_size_is_refused_before_anything_is_made(work, scratch, image_dir, size):
    args = ("sd-latents", image_dir, "--out", scratch / "lat.safetensors", "-m", work / "tinysd.safetensors")
    refused(work, *args, "--batch-size", size, match="--batch-size must be at least 1")


def test_a_full_disk_in_sd_latents_leaves_no_partial_parts(work, scratch, image_dir, monkeypatch):
    fail_writes(monkeypatch)
    out = scratch / "npy"
    args = ("sd-latents", image_dir, "--out", out, "-m", work / "tinysd.safetensors", "--device", "cpu")
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1 and "no space left" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    left = [p.name for p in out.rglob("*")] if out.exists() else []
    assert not [name for name in left if name.endswith(".tmp") or name.endswith(".npy")], left


# ---- images read right ---------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_applied(scratch, orientation):
    pixels = smooth_image(16, 40)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(scratch / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = open_image(scratch / "phone.jpg")
    assert image.size == ((16, 40) if orientation in (6, 8) else (40, 16))
    upright = {6: pixels.transpose(1, 0, 2)[:, ::-1], 8: pixels.transpose(1, 0, 2)[::-1], 3: pixels[::-1, ::-1]}
    assert np.abs(np.asarray(image).astype(int) - upright[orientation]).mean() < 8


def test_a_float_image_in_zero_to_one_is_scaled(scratch):
    values = np.linspace(0, 1, 24 * 32, dtype=np.float32).reshape(24, 32)
    Image.fromarray(values, "F").save(scratch / "f.tif")
    gray = np.asarray(open_image(scratch / "f.tif"))[..., 0]
    assert np.abs(gray.astype(float) - values * 255).max() <= 1


def test_a_float_image_on_the_8_bit_scale_stays(scratch):
    values = np.linspace(0, 255, 24 * 32, dtype=np.float32).reshape(24, 32)
    Image.fromarray(values, "F").save(scratch / "f.tif")
    assert np.abs(np.asarray(open_image(scratch / "f.tif"))[..., 0].astype(float) - values).max() <= 1


def test_a_float_tiff_with_nan_pixels_is_one_line(work, scratch, capfd):
    values = np.ones((16, 16), np.float32)
    values[3, 4] = np.nan
    Image.fromarray(values, "F").save(scratch / "nan.tif")
    refused(work, "encode", scratch / "nan.tif", "-m", work / "tiny.safetensors", match="NaN")
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("kind", ["tif", "png", "jpg", "webp"])
def test_a_truncated_image_is_one_line_and_nothing_else(work, scratch, capfd, kind):
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(64, 64)).save(buffer, format={"tif": "TIFF", "jpg": "JPEG"}.get(kind, kind.upper()))
    data = buffer.getvalue()
    (scratch / f"cut.{kind}").write_bytes(data[: len(data) // 2])
    refused(work, "encode", scratch / f"cut.{kind}", "-m", work / "tiny.safetensors", match="cut")
    assert capfd.readouterr().err == ""  # no line of Pillow's or libtiff's own


def test_threads_keeping_libtiff_quiet_give_stderr_back(scratch):
    """Decoders in several threads at once (the demo's): stderr is quiet while any is inside, and
    the real one is back once the last leaves, not a scratch file of another thread."""
    import time

    from hybrid_codec.images import quiet_stderr

    before = os.fstat(2)
    barrier = threading.Barrier(6)

    def decode(i: int) -> None:
        barrier.wait()
        with quiet_stderr():
            time.sleep(0.01 * (i % 3))

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n"], ids=["empty", "text", "magic only"])
def test_not_an_image(work, scratch, data):
    (scratch / "x.png").write_bytes(data)
    refused(work, "encode", scratch / "x.png", "-m", work / "tiny.safetensors", match="x.png")


def test_an_image_over_the_pixel_limit(work, scratch):
    Image.new("L", (300, 300)).save(scratch / "big.png")
    line = refused(
        work, "encode", scratch / "big.png", "-m", work / "tiny.safetensors", "--max-pixels", "1000", match=""
    )
    assert "too large" in line


# ---- latent files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 1, 10, 100, -1])
def test_a_truncated_latent_file(work, scratch, cut):
    data = (work / "a.latent.pt").read_bytes()
    (scratch / "t.latent.pt").write_bytes(data[:cut])
    refused(work, "decode", scratch / "t.latent.pt", "-m", work / "tiny.safetensors", match="t.latent.pt")


def test_a_latent_file_with_a_pickled_class_runs_nothing(work, scratch):
    marker = scratch / "ran"
    (scratch / "p.latent.pt").write_bytes(pickle.dumps(Bomb(marker)))
    refused(work, "decode", scratch / "p.latent.pt", "-m", work / "tiny.safetensors", match="not a hybrid-codec")
    assert not marker.exists()


def test_a_latent_declaring_a_huge_image(work, scratch):
    latent = Latent.from_bytes((work / "a.latent.pt").read_bytes())
    fields = latent.to_dict()
    fields.update(height=10**6, width=10**6, shape=[4, 125000, 125000])
    torch.save(fields, scratch / "h.latent.pt")
    refused(work, "decode", scratch / "h.latent.pt", "-m", work / "tiny.safetensors", match="too large")


# ---- races and signals ---------------------------------------------------------------------------------


def test_concurrent_writers_without_force_never_overwrite(scratch):
    target = scratch / "same.bin"
    outcomes: list[str] = []

    def write(i: int) -> None:
        try:
            write_atomic(target, bytes([i]) * 100_000, overwrite=False)
            outcomes.append(f"wrote {i}")
        except CodecError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrote = [o for o in outcomes if o.startswith("wrote")]
    assert len(wrote) == 1 and all("exists; use --force" in o for o in outcomes if o not in wrote)
    assert target.read_bytes() == bytes([int(wrote[0].split()[1])]) * 100_000
    assert sorted(p.name for p in scratch.iterdir()) == ["same.bin"]


def test_a_file_made_between_the_check_and_the_write_is_kept(work, scratch, monkeypatch):
    """Another encode that writes the same -o after this one checked it: this one fails, that file stays."""
    target = scratch / "same.latent.pt"
    real = paths_module.publish_new

    def meanwhile(tmp, path):
        path.write_bytes(b"the other process's file")
        real(tmp, path)

    monkeypatch.setattr(paths_module, "publish_new", meanwhile)
    result = CliRunner().invoke(
        app, ["encode", str(work / "a.png"), "-o", str(target), "-m", str(work / "tiny.safetensors")]
    )
    assert result.exit_code == 1 and result.stderr.strip().endswith("exists; use --force to overwrite")
    assert target.read_bytes() == b"the other process's file"
    assert sorted(p.name for p in scratch.iterdir()) == ["same.latent.pt"]


SLOW_WRITE = """
import os, sys, time
from hybrid_codec import cli, paths
real = os.fdopen
class Slow:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *a): self.f.close()
    def fileno(self): return self.f.fileno()
    def write(self, data):
        self.f.write(data[:10]); self.f.flush(); print("writing", flush=True); time.sleep(60)
paths.os.fdopen = lambda fd, mode="r", *a, **k: Slow(real(fd, mode, *a, **k)) if "w" in mode else real(fd, mode)
sys.argv = ["hybrid-codec", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_writing_leaves_no_temporary_file(work, scratch, signum):
    target = scratch / "x.latent.pt"
    args = ["encode", str(work / "a.png"), "-o", str(target), "-m", str(work / "tiny.safetensors"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert run.stdout.readline().strip() == b"writing"
    assert any(p.name.endswith(".tmp") for p in scratch.iterdir())  # the write is under way
    run.send_signal(signum)
    code = run.wait(60)
    err = run.stderr.read().decode()
    assert code == 1 and err.strip() == "error: interrupted" and "Traceback" not in err, err
    assert list(scratch.iterdir()) == []


# ---- the Python API -----------------------------------------------------------------------------------


def test_api_hostile_decode_arguments(codec):
    for bad in (None, 123, 4.5, [1, 2], object(), b"", b"HYBC", bytearray(b"x")):
        with pytest.raises(CodecError):
            codec.decode(bad)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("LA", (16, 16)),
        Image.new("P", (9, 7)),
        Image.new("I;16", (12, 12)),
        Image.new("CMYK", (8, 8)),
        Image.new("1", (11, 5)),
    ],
    ids=["LA", "P", "I;16", "CMYK", "1"],
)
def test_api_any_pillow_mode_encodes(codec, image):
    assert codec.decode(codec.encode(image)).size == image.size


@pytest.mark.parametrize(
    "image",
    [
        torch.empty(1, 3, 16, 16, device="meta"),
        torch.full((3, 16, 16), float("nan")),
        torch.zeros(3, 0, 16),
        torch.zeros(2, 4, 16, 16),
        np.zeros((16, 16, 2), np.uint8),
        np.zeros((16, 16), np.int64),
        np.zeros((0, 16, 3), np.uint8),
        Image.fromarray(np.full((8, 8), np.nan, np.float32), "F"),
        "no/such/file.png",
        object(),
    ],
    ids=[
        "meta",
        "nan tensor",
        "empty tensor",
        "4 channels",
        "2-channel array",
        "int64",
        "empty array",
        "nan F",
        "missing",
        "object",
    ],
)
def test_api_hostile_images(codec, image):
    with pytest.raises(CodecError):
        codec.encode(image)


@pytest.mark.parametrize(
    "fields",
    [
        {"codes": torch.zeros(4, 0, 8, dtype=torch.uint8), "height": 1, "width": 1},
        {"codes": torch.zeros(4, 6, 8, dtype=torch.uint8), "height": 1000, "width": 1000},
        {"codes": torch.zeros(4, 6, 8), "height": 48, "width": 64},
        {"codes": torch.zeros(4, 6, 8, dtype=torch.uint8, device="meta"), "height": 48, "width": 64},
        {"codes": torch.zeros(4, 6, 8, dtype=torch.int32), "height": 48, "width": 64},
        {"codes": torch.zeros(6, 8, dtype=torch.uint8), "height": 48, "width": 64},
        {"codes": torch.zeros(4, 6, 8, dtype=torch.uint8), "height": 48.0, "width": 64},
        {"codes": torch.zeros(4, 6, 8, dtype=torch.uint8), "height": 48, "width": 64, "step": torch.zeros(4)},
        {"codes": torch.zeros(4, 6, 8, dtype=torch.uint8), "height": 48, "width": 64, "low": torch.full((4,), np.nan)},
        {"codes": torch.zeros(4, 6, 8, dtype=torch.int32), "height": 48, "width": 64, "level": 0},
    ],
    ids=[
        "empty",
        "1000x1000 over 6x8",
        "float codes",
        "meta",
        "int32 8-bit",
        "2-D",
        "float height",
        "zero step",
        "nan low",
        "level 0",
    ],
)
def test_api_impossible_latents_are_refused(fields):
    base = {"low": torch.zeros(4), "step": torch.ones(4), "model": "tiny", "weights": "0" * 16}
    with pytest.raises(CodecError):
        Latent(**{**base, **fields})


def test_api_hostile_configs():
    for text in (nested(100_000), '{"latent_channels": 1000000}', "{" * 50 + "}" * 50, "x" * 2_000_000, b"\xff\xfe"):
        with pytest.raises(CodecError):
            CodecConfig.from_json(text)
    for fields in ({"latent_channels": 10**6}, {"decoder_hidden": 2**40}, {"downscale": 0}, {"decoder_kernel": 4}):
        with pytest.raises(CodecError):
            CodecConfig(**fields)


def test_api_model_with_nan_weights_and_meta_latents(codec):
    model = Autoencoder(TINY)
    with torch.no_grad():
        model.encoder.conv.kernel_weight.fill_(float("nan"))
    with pytest.raises(CodecError, match="NaN or infinite"):
        Codec(model)
    with pytest.raises(CodecError, match="meta device"):
        Codec(Autoencoder(TINY).to("meta"))
    with pytest.raises(CodecError, match="needs an Autoencoder"):
        Codec("photo")
    for latents in (torch.empty(1, 4, 2, 2, device="meta"), torch.zeros(1, 4, 0, 3), "latents"):
        with pytest.raises(CodecError):
            codec.decode_tensor(latents)


def test_json_depth_is_counted_without_recursion():
    assert json_depth('{"a": [1, {"b": "[[[["}]}') == 3
    assert json_depth(nested(1_000_000)) == 1_000_000
    assert load_json('{"a": [1, 2]}', "x") == {"a": [1, 2]}
    with pytest.raises(CodecError, match="nested deeper than 32"):
        load_json(nested(33), "x")


# ---- properties (hypothesis) ----------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK"]


@pytest.fixture(scope="module")
def module_codec(work) -> Codec:
    return load_codec(work / "tiny.safetensors", "cpu")


@PROPERTY
@given(height=st.integers(1, 70), width=st.integers(1, 70), mode=st.sampled_from(MODES), seed=st.integers(0, 99))
def test_any_size_and_mode_comes_back_exactly_that_size(module_codec, height, width, mode, seed):
    image = Image.fromarray(smooth_image(height, width, seed)).convert(mode)
    for source in (image, module_codec.to_bytes(module_codec.encode(image))):
        latent = module_codec.encode(image) if source is image else source
        assert module_codec.decode(latent).size == (width, height)


def mutated(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


EDITS = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=6)
CUTS = st.none() | st.integers(0, 4000)


@settings(max_examples=60, deadline=None)
@given(edits=EDITS, cut=CUTS)
def test_a_mutated_latent_file_is_refused_or_decodes(module_codec, work, edits, cut):
    data = mutated((work / "a.latent.pt").read_bytes(), edits, cut)
    try:
        image = module_codec.decode(data)
    except CodecError:
        return
    assert image.size == (40, 24) or image.width * image.height <= 64_000_000


@pytest.fixture(scope="module")
def photo_file(work) -> tuple[Codec, bytes]:
    photo = load_codec("photo", "cpu")
    return photo, photo.compress(work / "a.png", quality=3)


@settings(max_examples=40, deadline=None)
@given(edits=EDITS, cut=CUTS)
def test_a_mutated_compact_file_is_refused_or_decodes(photo_file, edits, cut):
    photo, data = photo_file
    try:
        photo.decode(mutated(data, edits, cut))
    except CodecError:
        pass


@PROPERTY
@given(edits=EDITS, cut=st.none() | st.integers(0, 100_000))
def test_a_mutated_weights_file_is_refused_or_loads(work, tmp_path_factory, edits, cut):
    path = tmp_path_factory.mktemp("mutated") / "w.safetensors"
    path.write_bytes(mutated((work / "tiny.safetensors").read_bytes(), edits, cut))
    try:
        codec = load_codec(path, "cpu")
    except CodecError:
        return
    assert codec.decode(codec.encode(work / "a.png")).size == (40, 24)


SIZES = st.integers(-5, 10) | st.integers(0, 10**13)


@settings(max_examples=200, deadline=None)
@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            "latent_channels": SIZES,
            "downscale": SIZES,
            "encoder_hidden": SIZES,
            "decoder_hidden": SIZES,
            "decoder_kernel": SIZES,
            "quality_levels": SIZES,
            "family": st.sampled_from(["hybrid", "dycnn", "dynet", "conv"]),
        },
    )
)
def test_random_configs_are_refused_before_any_large_allocation(fields):
    from hybrid_codec.config import MAX_PARAMETERS, parameter_count

    try:
        config = CodecConfig.from_json(json.dumps(fields))
    except CodecError:
        return
    assert parameter_count(config) <= MAX_PARAMETERS
    if parameter_count(config) < 300_000:  # small enough to build here: the estimate is honest
        model = Autoencoder(config)
        layers = sum(t.numel() for name, t in model.state_dict().items() if not name.startswith("levels"))
        assert layers <= 1.05 * parameter_count(config)
