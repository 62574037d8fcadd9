"""The `hybrid-codec` command line: every command, and every error as one line, exit 1, no leftovers."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, smooth_image
from PIL import Image
from typer.testing import CliRunner

from hybrid_codec import zoo
from hybrid_codec.bitstream import Latent
from hybrid_codec.cli import app
from hybrid_codec.codec import load_codec
from hybrid_codec.models import Autoencoder


def cli(*args: object):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an unexpected exception: show it, it is a bug
    return result


def ok(*args: object):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


def fails(*args: object, match: str):
    """The command exits 1 with exactly one line on stderr, naming the problem, and no traceback."""
    result = cli(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and re.search(match, lines[0]), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, hidden temporary files included, with its contents."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def save_png(path: Path, height: int = 40, width: int = 56, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth_image(height, width, seed)).save(path)
    return path


@pytest.fixture
def work(tmp_path, tiny_weights):
    """A folder with an image, the tiny weights, and other weights of the same config."""
    torch.manual_seed(1)
    Autoencoder(TINY).save_pretrained(tmp_path / "other.safetensors")
    save_png(tmp_path / "a.png")
    return tmp_path


@pytest.fixture
def shipped_tiny(monkeypatch, tiny_weights):
    """Make the tiny weights a shipped model named "tiny", so latents decode with their own model."""
    monkeypatch.setitem(zoo.SHIPPED, "tiny", tiny_weights.name)
    monkeypatch.setattr(zoo, "weights_dir", lambda: tiny_weights.parent)


# ---- encode -------------------------------------------------------------------------------------


def test_encode_writes_a_latent_beside_the_input(work):
    result = ok("encode", work / "a.png", "-m", work / "tiny.safetensors", "--device", "cpu")
    target = work / "a.latent.pt"
    latent = Latent.load(target)
    assert (latent.height, latent.width, latent.model) == (40, 56, "tiny")
    assert latent.weights == Autoencoder.from_pretrained(work / "tiny.safetensors").weights_hash()
    assert "a.latent.pt" in result.stdout and "bpp" in result.stdout
    # the file holds what the library's encode gives
    reference = load_codec(work / "tiny.safetensors", "cpu").encode(work / "a.png")
    assert torch.equal(latent.codes, reference.codes)


def test_encode_to_a_file_and_into_a_folder(work):
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors", "-o", work / "out" / "x.latent.pt")
    assert Latent.load(work / "out" / "x.latent.pt").width == 56
    (work / "existing").mkdir()
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors", "-o", work / "existing")
    assert Latent.load(work / "existing" / "a.latent.pt").height == 40
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors", "-o", work / "new_folder")
    assert Latent.load(work / "new_folder" / "a.latent.pt").height == 40
    assert not (work / "a.latent.pt").exists()


def test_encode_a_folder_recursively(work):
    photos = work / "photos"
    sizes = {"p1.png": (24, 40), "sub/p2.jpg": (33, 17), "sub/deeper/p3.webp": (16, 64)}
    for name, (h, w) in sizes.items():
        save_png(photos / name, h, w, seed=len(name))
    (photos / "sub" / "readme.txt").write_text("not an image")
    result = ok("encode", photos, "-m", work / "tiny.safetensors")
    for name, (h, w) in sizes.items():
        latent = Latent.load((photos / name).parent / (Path(name).stem + ".latent.pt"))
        assert (latent.height, latent.width) == (h, w)
    assert result.stdout.count(".latent.pt") == 3
    # and into one output folder
    ok("encode", photos, work / "a.png", "-m", work / "tiny.safetensors", "-o", work / "all")
    assert sorted(p.name for p in (work / "all").iterdir()) == [
        "a.latent.pt",
        "p1.latent.pt",
        "p2.latent.pt",
        "p3.latent.pt",
    ]


# ---- decode -------------------------------------------------------------------------------------


def test_decode_writes_a_png_beside_the_latent(work):
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors")
    result = ok("decode", work / "a.latent.pt", "-m", work / "tiny.safetensors", "--device", "cpu")
    target = work / "a.decoded.png"  # the stem without ".latent"
    assert "a.decoded.png" in result.stdout
    with Image.open(target) as image:
        assert image.size == (56, 40) and image.mode == "RGB"
        decoded = np.asarray(image)
    expected = load_codec(work / "tiny.safetensors", "cpu").decode(work / "a.latent.pt")
    assert np.array_equal(decoded, np.asarray(expected))
    ok("decode", work / "a.latent.pt", "-m", work / "tiny.safetensors", "-o", work / "sub" / "b.png")
    assert np.array_equal(np.asarray(Image.open(work / "sub" / "b.png")), decoded)


def test_decode_uses_the_model_the_latent_names(work, shipped_tiny):
    ok("encode", work / "a.png", "-m", "tiny")
    ok("decode", work / "a.latent.pt")  # no --model: the file says "tiny"
    assert Image.open(work / "a.decoded.png").size == (56, 40)


def test_decode_refuses_a_latent_made_by_other_weights(work, shipped_tiny):
    ok("encode", work / "a.png", "-m", work / "other.safetensors", "-o", work / "other.latent.pt")
    before = snapshot(work)
    fails("decode", work / "other.latent.pt", match="made by model 'tiny'.*not by the weights")  # its own name
    fails("decode", work / "other.latent.pt", "-m", work / "tiny.safetensors", match="not by the weights")
    assert snapshot(work) == before
    ok("decode", work / "other.latent.pt", "-m", work / "other.safetensors")


def test_decode_of_an_unshipped_model_asks_for_weights(work):
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors")
    before = snapshot(work)
    fails("decode", work / "a.latent.pt", match="names model 'tiny'.*--model")
    assert snapshot(work) == before


# ---- info and roundtrip -------------------------------------------------------------------------


def test_info_on_a_latent_file_and_a_weights_file(work):
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors")
    weights_hash = Autoencoder.from_pretrained(work / "tiny.safetensors").weights_hash()
    latent_info = ok("info", work / "a.latent.pt").stdout
    assert "latent" in latent_info and weights_hash in latent_info and "56x40" in latent_info
    size = (work / "a.latent.pt").stat().st_size
    assert f"{size:,} bytes" in latent_info and f"{size * 8 / (56 * 40):.3f}" in latent_info
    weights_info = ok("info", work / "tiny.safetensors").stdout
    assert "hybrid-codec weights" in weights_info and weights_hash in weights_info
    assert '"encoder_hidden": 4' in weights_info


def test_info_without_a_file_says_which_cpu_kernel_serves(monkeypatch):
    from hybrid_codec import fast

    text = ok("info").stdout
    assert "torch" in text and "CPU kernel" in text
    if fast._fast is not None:
        assert f"CPU kernel  {fast._fast.VARIANTS[0]}" in text
        monkeypatch.setenv("HYBRID_CODEC_KERNEL", "portable")
        assert "CPU kernel  portable" in ok("info").stdout
    monkeypatch.setenv("HYBRID_CODEC_KERNEL", "0")
    assert "none: HYBRID_CODEC_KERNEL=0" in ok("info").stdout
    monkeypatch.setenv("HYBRID_CODEC_KERNEL", "sse9")
    fails("info", match="HYBRID_CODEC_KERNEL='sse9'")


def test_roundtrip_prints_quality_size_and_timings_and_writes_a_comparison(work):
    before = snapshot(work)
    text = ok("roundtrip", work / "a.png", "-m", work / "tiny.safetensors").stdout
    assert snapshot(work) == before  # nothing written without -o
    found = re.search(
        r"PSNR ([\d.]+) dB\s+MS-SSIM ([\d.]+)\s+([\d.]+) bpp.*encode ([\d.]+) ms\s+decode ([\d.]+) ms", text
    )
    assert found, text
    psnr, ms_ssim, bpp = (float(found.group(i)) for i in (1, 2, 3))
    codec = load_codec(work / "tiny.safetensors", "cpu")
    latent = codec.encode(work / "a.png")
    assert bpp == pytest.approx(len(latent.to_bytes()) * 8 / (40 * 56), abs=1e-3)
    original = np.asarray(Image.open(work / "a.png"), dtype=np.float64)
    mse = ((original - np.asarray(codec.decode(latent), dtype=np.float64)) ** 2).mean()
    assert psnr == pytest.approx(10 * np.log10(255**2 / mse), abs=0.01)
    assert 0 < ms_ssim <= 1

    ok("roundtrip", work / "a.png", "-m", work / "tiny.safetensors", "-o", work / "cmp.png")
    with Image.open(work / "cmp.png") as image:
        assert image.width == 2 * 56 + 8 and image.height > 40
        assert np.array_equal(np.asarray(image.convert("RGB"))[-40:, :56], original.astype(np.uint8))
    fails("roundtrip", work / "a.png", "-m", work / "tiny.safetensors", "-o", work / "cmp.png", match="--force")


def test_roundtrip_of_small_images(work):
    save_png(work / "small.png", 20, 24)  # MS-SSIM with fewer scales
    save_png(work / "tiny.png", 5, 7)  # too small for MS-SSIM: shown as nan
    assert re.search(
        r"PSNR [\d.]+ dB\s+MS-SSIM 0\.\d+", ok("roundtrip", work / "small.png", "-m", work / "tiny.safetensors").stdout
    )
    assert "MS-SSIM nan" in ok("roundtrip", work / "tiny.png", "-m", work / "tiny.safetensors").stdout


# ---- train --------------------------------------------------------------------------------------


def test_train_command(image_folder, tmp_path):
    out = tmp_path / "run" / "w.safetensors"
    args = [*("train", image_folder, "--out", out, "--steps", 4, "--batch-size", 2, "--crop", 32, "--warmup", 1)]
    args += [*("--workers", 0, "--device", "cpu", "--encoder-hidden", 4, "--decoder-hidden", 4, "--name", "mine")]
    args += [*("--val-dir", image_folder, "--val-every", 2, "--val-limit", 1, "--checkpoint-every", 2)]
    result = ok(*args)
    assert re.search(r"trained 4 steps .* best validation PSNR [\d.]+ dB: wrote .*w\.safetensors", result.stdout)
    assert "step 4/4" in result.stderr  # progress reaches the end (plain lines when not a terminal)
    model = Autoencoder.from_pretrained(out)
    assert model.config.name == "mine" and model.config.encoder_hidden == 4
    assert (tmp_path / "run" / "w.ckpt").is_file()
    fails(*args, match="exists; --resume .* or --force")  # a finished run is not overwritten by accident
    ok(*args, "--force")
    fails(*args[:-6], "--loss", "l2", "--force", match="unknown loss")
    fails(*args[:-6], "--crop", 30, "--force", match="--crop must be a positive multiple of 8")
    fails(*args[:-6], "--checkpoint-every", 0, "--force", match="--checkpoint-every must be at least 1")


# ---- errors -------------------------------------------------------------------------------------


def test_missing_input_and_empty_folder(work):
    before = snapshot(work)
    fails("encode", work / "missing.png", "-m", work / "tiny.safetensors", match="missing.png: no such file")
    (work / "empty").mkdir()
    (work / "empty" / "notes.txt").write_text("no images here")
    before = snapshot(work)
    fails("encode", work / "empty", "-m", work / "tiny.safetensors", match="holds no images")
    fails("decode", work / "empty", "-m", work / "tiny.safetensors", match="holds no .hyb or .latent.pt files")
    fails("decode", work / "missing.latent.pt", "-m", work / "tiny.safetensors", match="no such file")
    fails("info", work / "missing.latent.pt", match="no such file")
    fails("roundtrip", work / "missing.png", "-m", work / "tiny.safetensors", match="no such file")
    assert snapshot(work) == before


def png_bytes(height: int = 40, width: int = 56) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(height, width)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(), "not an image"),
        (png_bytes()[:1500], "corrupt or truncated"),
        (b"", "not an image"),
    ],
    ids=["random-bytes", "truncated-png", "empty"],
)
def test_bad_image_is_refused(work, content, match):
    (work / "bad.png").write_bytes(content)
    before = snapshot(work)
    fails("encode", work / "bad.png", "-m", work / "tiny.safetensors", match=f"bad.png: {match}")
    fails("roundtrip", work / "bad.png", "-m", work / "tiny.safetensors", "-o", work / "c.png", match="bad.png")
    assert snapshot(work) == before


def test_bad_latent_files_are_refused(work):
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors")
    data = (work / "a.latent.pt").read_bytes()
    (work / "text.latent.pt").write_text("just some text, not a latent\n")
    (work / "cut.latent.pt").write_bytes(data[: len(data) // 2])
    (work / "tail.latent.pt").write_bytes(data[:-5])
    (work / "weights.latent.pt").write_bytes((work / "tiny.safetensors").read_bytes())
    (work / "text.safetensors").write_text("not weights")
    before = snapshot(work)
    for name in ("text", "cut", "tail", "weights"):
        path = work / f"{name}.latent.pt"
        fails("decode", path, "-m", work / "tiny.safetensors", match=f"{name}.latent.pt: .*(latent|payload)")
        fails("info", path, match=f"{name}.latent.pt")
    fails("info", work / "text.safetensors", match="not a safetensors weights file")
    assert snapshot(work) == before


def test_existing_output_needs_force(work):
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors")
    (work / "a.latent.pt").write_bytes(b"stale")
    before = snapshot(work)
    fails("encode", work / "a.png", "-m", work / "tiny.safetensors", match=r"a\.latent\.pt exists; use --force")
    assert snapshot(work) == before  # the old file is untouched
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors", "--force")
    assert Latent.load(work / "a.latent.pt").width == 56

    ok("decode", work / "a.latent.pt", "-m", work / "tiny.safetensors")
    (work / "a.decoded.png").write_bytes(b"stale")
    fails("decode", work / "a.latent.pt", "-m", work / "tiny.safetensors", match="a.decoded.png exists")
    assert (work / "a.decoded.png").read_bytes() == b"stale"
    ok("decode", work / "a.latent.pt", "-m", work / "tiny.safetensors", "-f")
    assert Image.open(work / "a.decoded.png").size == (56, 40)


@pytest.mark.parametrize("device", ["tpu", "xpu", "meta", "cuda:x", ""])
def test_unknown_device(work, device):
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors", "-o", work / "a.latent.pt")
    before = snapshot(work)
    for command in (
        ["encode", work / "a.png", "-o", work / "b.latent.pt"],
        ["decode", work / "a.latent.pt", "-o", work / "b.png"],
        ["roundtrip", work / "a.png", "-o", work / "b.png"],
    ):
        fails(*command, "-m", work / "tiny.safetensors", "--device", device, match="unknown device")
    assert snapshot(work) == before


def test_unavailable_device(work):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors")
    shutil.copy(work / "a.latent.pt", work / "c.latent.pt")
    before = snapshot(work)
    weights = ["-m", work / "tiny.safetensors"]
    fails("encode", work / "a.png", "-o", work / "b.latent.pt", *weights, "--device", "cuda", match="CUDA is not av")
    # several latents, one error: the device is checked before any file
    fails("decode", work / "a.latent.pt", work / "c.latent.pt", "-o", work / "d", "--device", "cuda", match="CUDA")
    assert snapshot(work) == before


def test_missing_weights_file(work):
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors")
    shutil.copy(work / "a.latent.pt", work / "c.latent.pt")
    before = snapshot(work)
    missing = work / "nope.safetensors"
    fails("encode", work / "a.png", "-o", work / "b.latent.pt", "-m", missing, match="nope.safetensors: neither")
    fails("decode", work / "a.latent.pt", work / "c.latent.pt", "-o", work / "d", "-m", missing, match="nope")
    fails("roundtrip", work / "a.png", "-m", missing, match="nope.safetensors")
    fails("encode", work / "a.png", "-o", work / "b.latent.pt", "-m", work / "a.png", match="not a safetensors")
    assert snapshot(work) == before


def test_image_too_large(work, monkeypatch):
    monkeypatch.setattr("hybrid_codec.images.MAX_PIXELS", 40 * 56 - 1)
    before = snapshot(work)
    fails("encode", work / "a.png", "-m", work / "tiny.safetensors", match=r"56x40 is too large")
    fails("roundtrip", work / "a.png", "-m", work / "tiny.safetensors", "-o", work / "c.png", match="too large")
    assert snapshot(work) == before


def test_one_bad_input_among_several(work):
    save_png(work / "b.png", 24, 24, seed=2)
    (work / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = cli("encode", work / "a.png", work / "bad.png", work / "b.png", "-m", work / "tiny.safetensors")
    assert result.exit_code == 1
    assert Latent.load(work / "a.latent.pt").width == 56 and Latent.load(work / "b.latent.pt").width == 24
    assert not (work / "bad.latent.pt").exists()
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [
        next(line for line in lines if "bad.png" in line),
        "error: 1 of 3 files failed",
    ]
    assert "Traceback" not in result.output
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary files

    (work / "bad.latent.pt").write_bytes(b"junk")
    result = cli(
        "decode", work / "a.latent.pt", work / "bad.latent.pt", work / "b.latent.pt", "-m", work / "tiny.safetensors"
    )
    assert result.exit_code == 1 and "error: 1 of 3 files failed" in result.stderr
    assert (work / "a.decoded.png").is_file() and (work / "b.decoded.png").is_file()
    assert not (work / "bad.decoded.png").exists()


# ---- the real console script --------------------------------------------------------------------


def test_console_script_exit_codes_and_one_line_errors(work):
    script = Path(sys.executable).with_name("hybrid-codec")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "60"}  # narrow: long errors must still be one line

    def run(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([script, *map(str, args)], capture_output=True, text=True, env=env, cwd=work, timeout=120)

    done = run("encode", "a.png", "-m", "tiny.safetensors", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert (work / "a.latent.pt").is_file()
    (work / "junk.latent.pt").write_bytes(b"\x80\x02junk")
    (work / "bad.png").write_bytes(b"not a png at all")
    before = snapshot(work)
    for args in (
        ["decode", "junk.latent.pt", "-m", "tiny.safetensors"],
        ["encode", "bad.png", "-m", "tiny.safetensors", "--device", "xpu"],
    ):
        done = run(*args)
        assert done.returncode == 1, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr + done.stdout
    assert snapshot(work) == before


def test_quality_levels_on_the_command_line(tmp_path):
    image = save_png(tmp_path / "a.png", 64, 80)
    ok("encode", image, "-q", 1, "-o", tmp_path / "small.hyb")
    ok("encode", image, "--quality", 9, "-o", tmp_path / "large.hyb")
    assert 0 < (tmp_path / "small.hyb").stat().st_size < (tmp_path / "large.hyb").stat().st_size
    default = ok("encode", image).stdout
    assert (tmp_path / "a.hyb").exists() and f"quality {load_codec().check_quality(None)}" in default
    assert re.search(r"quality level\s+1\b", ok("info", tmp_path / "small.hyb").stdout)
    ok("decode", tmp_path / "small.hyb", "-o", tmp_path / "small.png")
    assert Image.open(tmp_path / "small.png").size == (80, 64)
    ok("encode", image, "-q", 3, "-o", tmp_path / "a.latent.pt")
    assert torch.load(tmp_path / "a.latent.pt", weights_only=True)["level"] == 3
    ok("decode", tmp_path / "a.latent.pt", "-o", tmp_path / "pt.png")
    assert "quality 3" in ok("roundtrip", image, "-q", 3).stdout
    fails("encode", image, "-q", 10, "-o", tmp_path / "x.hyb", match="quality must be an integer from 1 to 9")
    fails("encode", image, "-q", 0, "-o", tmp_path / "x.hyb", match="0")
    fails("encode", image, "-q", 2, "--model", "native", "-o", tmp_path / "x.latent.pt", match="no quality levels")
    assert not (tmp_path / "x.hyb").exists() and not (tmp_path / "x.latent.pt").exists()


def test_a_folder_of_both_kinds_of_latent_files_decodes(tmp_path):
    save_png(tmp_path / "in" / "a.png")
    save_png(tmp_path / "in" / "b.png", seed=1)
    ok("encode", tmp_path / "in" / "a.png", "-o", tmp_path / "lat" / "a.hyb")
    ok("encode", tmp_path / "in" / "b.png", "--model", "native", "-o", tmp_path / "lat" / "b.latent.pt")
    ok("decode", tmp_path / "lat", "-o", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.decoded.png", "b.decoded.png"]


def test_eval_prints_the_table_and_writes_json_and_plot(tmp_path):
    import json

    for i in range(3):
        save_png(tmp_path / "images" / f"{i}.png", 96, 128, seed=i)
    result = ok(
        "eval",
        tmp_path / "images",
        "--classic",
        "JPEG,WebP",
        "--json",
        tmp_path / "rd.json",
        "--plot",
        tmp_path / "rd.png",
    )
    assert "level 1" in result.stdout and "level 9" in result.stdout and "WebP" in result.stdout
    assert "photo vs JPEG: BD-rate" in result.stdout
    body = json.loads((tmp_path / "rd.json").read_text())
    assert len(body["points"]) == 3 * (9 + 8 + 6)
    assert {p["codec"] for p in body["points"]} == {"photo", "JPEG", "WebP"}
    assert all(p["bpp"] > 0 and 5 < p["psnr"] < 60 for p in body["points"])
    deltas = {d["anchor"]: d for d in body["deltas"]}
    assert set(deltas) == {"JPEG", "WebP"}
    # these smooth images: WebP shares the model's rates (a finite BD-PSNR), not its PSNRs; JPEG shares neither
    assert np.isfinite(deltas["WebP"]["bd_psnr"]) and np.isfinite(deltas["WebP"]["bd_ms_ssim"])
    assert "n/a (no common range)" in result.stdout
    assert (tmp_path / "rd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fails("eval", tmp_path / "images", "--classic", "GIF", match="unknown classic codec 'GIF'")
    fails("eval", tmp_path / "images", "--json", tmp_path / "rd.json", match="exists")


def test_eval_of_a_model_without_levels_has_one_point(tmp_path):
    save_png(tmp_path / "images" / "a.png", 48, 64)
    result = ok("eval", tmp_path / "images", "--model", "native", "--classic", "JPEG")
    assert "8-bit" in result.stdout and "n/a" in result.stdout
