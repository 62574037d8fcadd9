"""A newcomer's first hour (issue 17): names of trained models, help screens, output naming, short
training runs and their checkpoints, error hints, file modes, the README's Python snippet."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch
from conftest import TINY
from test_cli import fails, ok, save_png, snapshot
from test_train import QUIET, options

from hybrid_codec import sd
from hybrid_codec.cli import resume_command
from hybrid_codec.models import Autoencoder
from hybrid_codec.train import train
from hybrid_codec.training import Interrupted

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def work(tmp_path, tiny_weights):
    save_png(tmp_path / "a.png")
    save_png(tmp_path / "b.png", seed=1)
    return tmp_path


# ---- 1: trained models are named after their file; shipped names work where a path does


def test_a_trained_model_is_named_after_its_file_and_its_latents_say_which_file(image_folder, tmp_path):
    out = tmp_path / "mine.safetensors"
    args = ["train", image_folder, "--out", out, "--steps", 2, "--batch-size", 2, "--crop", 32, "--warmup", 1]
    ok(*args, "--workers", 0, "--device", "cpu", "--encoder-hidden", 4, "--decoder-hidden", 4)
    assert Autoencoder.from_pretrained(out).config.name == "mine"
    save_png(tmp_path / "x.png")
    ok("encode", tmp_path / "x.png", "-m", out)
    fails("decode", tmp_path / "x.latent.pt", match=r"names model 'mine'.*--model mine\.safetensors")
    ok("decode", tmp_path / "x.latent.pt", "-m", out)


def test_info_takes_a_shipped_name():
    assert "photo" in ok("info", "photo").stdout
    assert "8-bit min/max" in ok("info", "native").stdout


# ---- 3: help screens


@pytest.mark.parametrize("command", ["encode", "decode", "train", "distill", "roundtrip", "sd-latents"])
def test_help_shows_plain_flags_and_argument_names(command):
    text = ok(command, "--help").stdout
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "<bool>" not in text and "{" not in usage
    assert re.search(rf"Usage: .*{command} \[OPTIONS\] [A-Z_]+", usage), usage


def test_the_top_level_help_shows_help_as_a_flag():
    assert "<bool>" not in ok("--help").stdout


def test_train_help_explains_every_option_and_shows_the_model_default():
    text = ok("train", "--help").stdout
    for flag in ("--steps", "--crop", "--lr", "--warmup", "--checkpoint-every", "--seed", "--encoder-hidden"):
        line = next(line for line in text.splitlines() if flag in line)
        assert re.search(rf"{flag}\s+<\w+>\s+\w", line), line  # a help text follows the type
    assert "photo" in ok("encode", "--help").stdout.split("--model")[1].split("--device")[0]
    assert "--force" in text and "-f " in text and text.count("-f ") == 1  # only --force has -f


def test_version():
    text = ok("--version").stdout
    assert text.startswith("hybrid-codec ") and "torch" in text and "CPU kernel" in text


# ---- 4: short training runs, checkpoints, Ctrl-C


def test_a_warmup_not_shorter_than_the_run_is_warned_about(image_folder, tmp_path):
    said = []
    train(options(image_folder, tmp_path / "w.safetensors", steps=3, warmup=30), log=said.append)
    assert any("--warmup 30 is not shorter than --steps 3" in m for m in said), said
    assert any(f"to {tmp_path / 'w.ckpt'} (kept after the run)" in m for m in said), said


def test_ctrl_c_says_which_checkpoint_holds_how_many_steps(image_folder, tmp_path):
    def interrupt(step, total, metrics):
        if step == 7:
            raise KeyboardInterrupt

    opts = options(image_folder, tmp_path / "w.safetensors", steps=20, checkpoint_every=5)
    with pytest.raises(Interrupted) as stopped:
        train(opts, report=interrupt, **QUIET)
    assert (stopped.value.step, stopped.value.saved_step) == (7, 5)
    assert stopped.value.checkpoint == tmp_path / "w.ckpt" and (tmp_path / "w.ckpt").is_file()
    with pytest.raises(Interrupted, match="before the first checkpoint"):
        train(options(image_folder, tmp_path / "v.safetensors", checkpoint_every=50), report=interrupt, **QUIET)


def test_the_resume_command_is_the_same_command_without_force():
    argv = ["train", "my photos", "--out", "w.safetensors", "--force", "--steps", "30", "--resume", "old.ckpt"]
    assert resume_command(argv, Path("w.ckpt")) == (
        "hybrid-codec train 'my photos' --out w.safetensors --steps 30 --resume w.ckpt"
    )


def test_info_describes_a_checkpoint(image_folder, tmp_path):
    train(options(image_folder, tmp_path / "w.safetensors", steps=3), **QUIET)
    text = ok("info", tmp_path / "w.ckpt").stdout
    assert "training checkpoint" in text and "3 of 3" in text and "--resume" in text and "tiny" in text
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    fails("info", tmp_path / "junk.ckpt", match="not a readable training checkpoint")


# ---- 5: error hints point somewhere


def test_the_offline_hint_names_hf_download_and_the_commands_own_flag(tmp_path):
    with pytest.raises(sd.CodecError, match=r"hf download nobody/no-such-vae.*--teacher"):
        sd.load_vae("sd", "nobody/no-such-vae", "cpu", flag="--teacher")


def test_taesd_refuses_a_native_latent_before_loading_any_vae(work, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a VAE was loaded")

    monkeypatch.setattr(sd, "load_vae", no_loading)
    ok("encode", work / "a.png", "-m", work / "tiny.safetensors", "-o", work / "a.latent.pt")
    fails("decode", work / "a.latent.pt", "--decoder", "taesd", match="only SD-space latents")


# ---- 6: output naming


def test_several_inputs_into_a_file_name_are_refused(work):
    before = snapshot(work)
    fails("encode", work / "a.png", work / "b.png", "-o", work / "single.latent.pt", match="need a folder")
    assert snapshot(work) == before and not (work / "single.latent.pt").exists()


def test_a_latent_needs_a_latent_suffix(work):
    fails("encode", work / "a.png", "-o", work / "foo.png", match=r"must end in \.hyb or \.pt")
    ok("encode", work / "a.png", "-o", work / "foo.hyb")


def test_two_inputs_for_one_output_are_named(work):
    save_png(work / "sub" / "a.png")
    fails("encode", work / "a.png", work / "sub" / "a.png", "-o", work / "out", match=r"a\.png and .*sub/a\.png")


def test_encoding_a_folder_again_skips_its_own_outputs(work):
    folder = work / "photos"
    save_png(folder / "p.png")
    ok("encode", folder)
    ok("decode", folder / "p.hyb")
    ok("roundtrip", folder / "p.png", "-o", folder / "p.comparison.png")
    text = ok("encode", folder, "--force").stdout
    assert "p.decoded" not in text and "p.comparison" not in text and "p.png" in text


# ---- 7: file modes, the README's snippet


def test_outputs_respect_the_umask(work):
    mask = os.umask(0o022)
    try:
        ok("encode", work / "a.png", "-o", work / "a.hyb")
        Autoencoder(TINY).save_pretrained(work / "w.safetensors")
    finally:
        os.umask(mask)
    for path in (work / "a.hyb", work / "w.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_the_readme_python_snippet_runs(tmp_path, monkeypatch):
    text = README.read_text()
    snippet = text[text.index("## Python") :].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["image"].size == (256, 192)
    assert isinstance(namespace["latents"], list) and len(namespace["latents"]) == 2
    assert namespace["x"].shape == (2, 3, 64, 96) and torch.all(namespace["x"] <= 1)


def test_roundtrip_labels_first_call_timings(work):
    assert "first calls" in ok("roundtrip", work / "a.png", "-m", work / "tiny.safetensors").stdout
