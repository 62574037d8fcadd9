"""Hostile values of the options and API calls the first hostile suite left open: training options that
size memory or seed generators, latents a model cannot code, tensors of the wrong shape or size, NUL
bytes in paths, a folder missing before a progress bar, a demo model without quality levels."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from conftest import TINY, smooth_image
from PIL import Image
from typer.testing import CliRunner

from hybrid_codec.cli import app
from hybrid_codec.codec import load_codec
from hybrid_codec.entropy import CODE_LIMIT
from hybrid_codec.errors import CodecError
from hybrid_codec.models import Autoencoder


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("options")
    (work / "imgs").mkdir()
    Image.fromarray(smooth_image(32, 32)).save(work / "imgs" / "a.png")
    torch.manual_seed(0)
    Autoencoder(TINY).save_pretrained(work / "tiny.safetensors")
    return work


def refused(work, *args, match: str) -> None:
    before = sorted(os.listdir(work))
    result = CliRunner().invoke(app, [str(a) for a in args])
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and match in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert sorted(os.listdir(work)) == before


TRAIN = ["train", "imgs", "--out", "o.safetensors", "--steps", "2", "--workers", "0", "--device", "cpu"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--seed", "-1"], "--seed must be from 0"),
        (["--seed", str(2**70)], "--seed must be from 0"),
        (["--batch-size", str(10**9)], "GiB of pixels a step"),  # grew until the kernel killed it
        (["--crop", str(8 * 10**5)], "GiB of pixels a step"),
        (["--max-minutes", "nan"], "--max-minutes must not be negative"),
    ],
)
def test_training_options_refused_before_anything(work, monkeypatch, extra, match):
    monkeypatch.chdir(work)
    refused(work, *TRAIN, *extra, match=match)


def test_train_out_a_dangling_symlink_needs_force(work, monkeypatch):
    monkeypatch.chdir(work)
    os.symlink(work / "nowhere", work / "dangle.safetensors")
    try:
        refused(work, *TRAIN[:3], "dangle.safetensors", *TRAIN[4:], match="--force to start afresh")
        assert not (work / "nowhere").exists()
    finally:
        os.unlink(work / "dangle.safetensors")


def test_eval_of_a_missing_folder_is_one_line(work, monkeypatch):
    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, ["eval", "no[/]such", "-m", "tiny.safetensors", "--classic", ""])
    assert result.exit_code == 1 and result.stderr.strip() == "error: no[/]such: no such folder", result.stderr


@pytest.fixture(scope="module")
def photo():
    return load_codec("photo", "cpu")


def test_a_latent_the_model_cannot_code_is_a_codec_error(photo):
    latent = photo.encode(np.zeros((48, 64, 3), np.uint8), quality=2)
    with pytest.raises(CodecError, match="level 99 does not exist"):
        photo.to_bytes(dataclasses.replace(latent, level=99))
    with pytest.raises(CodecError, match=f"within \\+-{CODE_LIMIT}"):
        photo.to_bytes(dataclasses.replace(latent, codes=latent.codes + CODE_LIMIT + 1))
    for bad in ({"model": None}, {"weights": 5}, {"latent_space": "bogus"}):
        with pytest.raises(CodecError, match="must be strings"):
            dataclasses.replace(latent, **bad)


@pytest.mark.parametrize(
    ("call", "shape"),
    [
        ("encode_tensor", (1, 2, 16, 16)),  # two channels
        ("encode_tensor", (1, 3, 10**5, 10**5)),  # 10^10 pixels, an expanded view: no memory of its own
        ("decode_tensor", (1, 4, 10**5, 10**5)),
    ],
)
def test_tensor_calls_refuse_wrong_shapes_and_sizes(photo, call, shape):
    tensor = torch.zeros(1, 1, 1, 1).expand(*shape)
    with pytest.raises(CodecError):
        getattr(photo, call)(tensor)


@pytest.mark.parametrize("call", ["encode", "decode"])
def test_a_path_with_a_nul_byte_is_a_codec_error(photo, call):
    with pytest.raises(CodecError, match="not a usable file name"):
        getattr(photo, call)("a\0b.png")


def test_the_demo_page_builds_for_a_model_without_quality_levels(tmp_path):
    pytest.importorskip("gradio")
    from hybrid_codec.demo import Demo, build

    assert build(Demo("native", "cpu", tmp_path / "files")) is not None  # Gradio refused its 1..1 slider


def test_a_damaged_part_is_refused_before_any_image_is_encoded(tmp_path, monkeypatch):
    import io
    import json

    from hybrid_codec.sd_dataset import _settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    for name in ("a", "b"):
        Image.fromarray(smooth_image(32, 32)).save(tmp_path / "imgs" / f"{name}.png")
    parts = tmp_path / ".out.safetensors.parts"
    parts.mkdir()
    (parts / "sd-latents.json").write_text(json.dumps(_settings("sd", True, "cpu"), indent=1, sort_keys=True))
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 4, 4), np.float32))
    (parts / "a.npy").write_bytes(buffer.getvalue()[:-8])  # cut short by a crash or a full disk
    result = CliRunner().invoke(app, ["sd-latents", "imgs", "--out", "out.safetensors", "--device", "cpu"])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1 and len(lines) == 1 and "a truncated latent part" in lines[0], result.stderr
    assert sorted(os.listdir(parts)) == ["a.npy", "sd-latents.json"]  # b was not encoded first
