"""Training: a short real run learns, best weights are exported, resume after SIGKILL is exact, DDP, options."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, smooth_image
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from hybrid_codec import train as train_module
from hybrid_codec.cli import app
from hybrid_codec.data import RandomCrops, usable_images
from hybrid_codec.errors import CodecError
from hybrid_codec.layers import DyConv2d
from hybrid_codec.models import Autoencoder
from hybrid_codec.options import TrainOptions
from hybrid_codec.train import reconstruction_loss, train
from hybrid_codec.training import Recipe, fit, lr_factor

QUIET = {"log": lambda message: None}


def options(data: Path, out: Path, **changes) -> TrainOptions:
    """A tiny, fast, deterministic CPU run."""
    base = dict(
        steps=20,
        batch_size=4,
        crop=32,
        lr=5e-3,
        warmup=4,
        ema=0.9,
        workers=0,
        device="cpu",
        model=TINY,
        checkpoint_every=10,
        seed=0,
    )
    return TrainOptions(data_dir=data, out=out, **{**base, **changes})


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: the same arithmetic in this process and in a subprocess with OMP_NUM_THREADS=1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_short_run_learns(image_folder, tmp_path):
    reports: list[tuple[int, int, dict]] = []
    opts = options(
        image_folder, tmp_path / "w.safetensors", steps=40, crop=48, val_dir=image_folder, val_every=10, val_limit=2
    )
    result = train(opts, report=lambda *r: reports.append(r), **QUIET)

    assert [step for step, _, _ in reports] == list(range(1, 41)) and {total for _, total, _ in reports} == {40}
    losses = [m["loss"] for _, _, m in reports]
    assert all(math.isfinite(v) for v in losses)
    assert mean(losses[-8:]) < 0.6 * mean(losses[:8]), losses
    val = [m["val_psnr"] for _, _, m in reports if "val_psnr" in m]
    assert len(val) == 4 and val[-1] > val[0] + 1.0, val
    assert result.steps == 40 and result.best_val_psnr == max(val) and result.last_loss == losses[-1]
    # the learning rate follows warm-up then cosine decay, step by step
    for step, _, m in reports:
        assert m["lr"] == pytest.approx(opts.lr * lr_factor(step, opts.warmup, opts.steps), rel=1e-6)

    model = Autoencoder.from_pretrained(tmp_path / "w.safetensors")
    assert model.config == TINY
    paths = sorted(image_folder.glob("*.png"))[:2]
    assert train_module.validate(model, paths, torch.device("cpu")) == pytest.approx(max(val), abs=1e-6)
    checkpoint = torch.load(tmp_path / "w.ckpt", weights_only=True)
    assert checkpoint["step"] == 40 and checkpoint["format"] == "hybrid-codec-checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "w.ckpt", "w.safetensors"]  # no temporaries


def test_best_validation_weights_are_exported(image_folder, tmp_path, monkeypatch):
    scores = iter([10.0, 20.0, 15.0, 12.0])
    seen: list[dict[str, torch.Tensor]] = []

    def fake_validate(model, paths, device):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(train_module, "validate", fake_validate)
    result = train(
        options(image_folder, tmp_path / "w.safetensors", steps=8, val_dir=image_folder, val_every=2), **QUIET
    )
    assert result.best_val_psnr == 20.0 and len(seen) == 4
    exported = load_file(tmp_path / "w.safetensors")
    best, last = seen[1], seen[3]
    assert all(torch.equal(exported[k], best[k]) for k in exported)  # the second validation's weights
    assert not all(torch.equal(exported[k], last[k]) for k in exported)
    # without a validation folder, the final (EMA) weights are exported
    result = train(options(image_folder, tmp_path / "final.safetensors", steps=3), **QUIET)
    assert result.best_val_psnr is None and (tmp_path / "final.safetensors").is_file()


def cli_args(data: Path, out: Path, steps: int) -> list[str]:
    args = ["--out", out, "--steps", steps, "--batch-size", 4, "--crop", 32, "--lr", 5e-3, "--warmup", 5]
    args += ["--ema", 0.9, "--workers", 0, "--device", "cpu", "--encoder-hidden", 4, "--decoder-hidden", 4]
    args += ["--val-dir", data, "--val-every", 10, "--val-limit", 1, "--checkpoint-every", 3, "--seed", 3]
    return [str(data), *map(str, args)]


def train_in_process(args: list[str]) -> None:
    with one_thread():
        result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output


def test_resume_after_sigkill_matches_an_uninterrupted_run(image_folder, tmp_path):
    steps = 150  # long enough that the kill lands mid-run
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train_in_process(cli_args(image_folder, straight / "w.safetensors", steps))

    broken.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hybrid_codec", "train", *cli_args(image_folder, broken / "w.safetensors", steps)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = broken / "w.ckpt"
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {stderr.decode()}"
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < killed_at < steps

    train_in_process([*cli_args(image_folder, broken / "w.safetensors", steps), "--resume", str(checkpoint)])
    for name in ("w.safetensors", "w.ckpt"):
        assert (broken / name).is_file()
    a, b = load_file(straight / "w.safetensors"), load_file(broken / "w.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    final_a = torch.load(straight / "w.ckpt", weights_only=True)
    final_b = torch.load(checkpoint, weights_only=True)
    assert final_a["step"] == final_b["step"] == steps
    assert final_a["best_val_psnr"] == pytest.approx(final_b["best_val_psnr"], abs=1e-6)
    for part in ("model", "ema"):
        for key, value in final_a[part].items():
            torch.testing.assert_close(final_b[part][key], value, rtol=0, atol=1e-6, msg=f"{part}.{key}")


def test_resume_refuses_a_foreign_or_broken_checkpoint(image_folder, tmp_path):
    train(options(image_folder, tmp_path / "w.safetensors", steps=2), **QUIET)
    messages: list[str] = []  # resuming with other data or schedule settings works, but says so
    train(
        options(image_folder, tmp_path / "w.safetensors", steps=3, seed=1, resume=tmp_path / "w.ckpt"),
        log=messages.append,
    )
    assert any("changed options" in m and "steps 2 -> 3" in m and "seed 0 -> 1" in m for m in messages), messages
    wider = dataclasses.replace(TINY, decoder_hidden=6)
    with pytest.raises(CodecError, match="not a checkpoint of this model configuration"):
        train(options(image_folder, tmp_path / "x.safetensors", model=wider, resume=tmp_path / "w.ckpt"), **QUIET)
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(CodecError, match="not a readable training checkpoint"):
        train(options(image_folder, tmp_path / "x.safetensors", resume=tmp_path / "junk.ckpt"), **QUIET)
    with pytest.raises(CodecError, match="no such checkpoint"):
        train(options(image_folder, tmp_path / "x.safetensors", resume=tmp_path / "none.ckpt"), **QUIET)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.ckpt").exists()


SITECUSTOMIZE = """
import os

if "RANK" in os.environ:  # a torchrun worker: log every file it puts in place (all outputs are atomic renames)
    _replace = os.replace

    def replace(src, dst, *args, **kwargs):
        with open(os.environ["WRITE_LOG"] + "." + os.environ["RANK"], "a") as log:
            log.write(f"{dst}\\n")
        return _replace(src, dst, *args, **kwargs)

    os.replace = replace
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_ddp_two_processes_on_cpu_only_rank_zero_writes(image_folder, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "run" / "w.safetensors"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
        "WRITE_LOG": str(tmp_path / "writes"),
    }
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += ["-m", "hybrid_codec", "train", image_folder, "--out", out, "--device", "cpu", "--steps", 6]
    command += ["--batch-size", 2, "--crop", 32, "--workers", 0, "--encoder-hidden", 4, "--decoder-hidden", 4]
    command += ["--val-dir", image_folder, "--val-every", 3, "--val-limit", 1, "--checkpoint-every", 3, "--warmup", 1]
    done = subprocess.run(list(map(str, command)), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 6 steps" in done.stdout

    rank0 = (tmp_path / "writes.0").read_text().split()
    assert not (tmp_path / "writes.1").exists()  # rank 1 wrote nothing
    assert str(out) in rank0 and str(out.with_suffix(".ckpt")) in rank0
    assert sorted(p.name for p in out.parent.iterdir()) == ["w.ckpt", "w.safetensors"]
    assert torch.load(out.with_suffix(".ckpt"), weights_only=True)["step"] == 6
    Autoencoder.from_pretrained(out)


def test_init_from_existing_weights(image_folder, tmp_path, tiny_weights):
    source = Autoencoder.from_pretrained(tiny_weights)
    # with a negligible learning rate the run stays where it started
    opts = options(image_folder, tmp_path / "w.safetensors", steps=2, lr=1e-12, ema=0, init_from=tiny_weights, seed=5)
    train(dataclasses.replace(opts, model=dataclasses.replace(TINY, name="renamed")), **QUIET)
    tuned = Autoencoder.from_pretrained(tmp_path / "w.safetensors")
    assert tuned.config.name == "renamed"  # the run's name, the source's weights
    for (name, a), (_, b) in zip(source.named_parameters(), tuned.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    fresh = options(image_folder, tmp_path / "fresh.safetensors", steps=2, lr=1e-12, ema=0, seed=5)
    train(fresh, **QUIET)
    scratch = Autoencoder.from_pretrained(tmp_path / "fresh.safetensors")
    assert not torch.allclose(scratch.encoder.conv.similar_conv.weight, source.encoder.conv.similar_conv.weight)

    wider = dataclasses.replace(TINY, encoder_hidden=6)
    with pytest.raises(CodecError, match="differs from this run"):
        train(options(image_folder, tmp_path / "x.safetensors", model=wider, init_from=tiny_weights), **QUIET)
    with pytest.raises(CodecError, match="neither a shipped model"):
        train(options(image_folder, tmp_path / "x.safetensors", init_from=tmp_path / "none.safetensors"), **QUIET)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("loss", ["mse", "psnr", "ms-ssim", "mix"])
def test_each_loss_trains(image_folder, tmp_path, loss):
    losses: list[float] = []
    train(
        options(image_folder, tmp_path / "w.safetensors", steps=12, loss=loss, ema=0, lr=1e-2, warmup=1),
        report=lambda step, total, m: losses.append(m["loss"]),
        **QUIET,
    )
    assert len(losses) == 12 and all(math.isfinite(v) and (v > 0 or loss == "psnr") for v in losses)
    assert mean(losses[-3:]) < mean(losses[:3]), losses


def test_reconstruction_losses():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 32, 32)
    noisy = (image + 0.1 * torch.randn_like(image)).clamp(0, 1)
    noisier = (image + 0.3 * torch.randn_like(image)).clamp(0, 1)
    for kind in ("mse", "ms-ssim", "mix"):
        assert reconstruction_loss(kind, image, image).item() == pytest.approx(0, abs=1e-6)
        assert 0 < reconstruction_loss(kind, image, noisy) < reconstruction_loss(kind, image, noisier)
    assert reconstruction_loss("mse", image, noisy) == pytest.approx(((image - noisy) ** 2).mean().item())


def test_psnr_loss_is_minus_the_mean_per_image_psnr():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 32, 32)
    decoded = image.clone()
    decoded[0] += 0.01 * torch.randn_like(image[0])  # a nearly perfect image beside a poor one
    decoded[1] += 0.3 * torch.randn_like(image[1])
    per_image = [10 * math.log10(((image[i] - decoded[i]) ** 2).mean().item()) for i in range(2)]
    loss = reconstruction_loss("psnr", image, decoded)
    assert loss.item() == pytest.approx(mean(per_image), abs=1e-3)
    assert reconstruction_loss("psnr", image, image).item() == pytest.approx(-100, abs=1e-3)  # capped, finite
    # every image counts in decibels: the good image gets a share of the gradient that MSE would not give it
    for kind in ("psnr", "mse"):
        d = decoded.clone().requires_grad_(True)
        reconstruction_loss(kind, image, d).backward()
        share = (d.grad[0].norm() / d.grad[1].norm()).item()
        assert share > 1 if kind == "psnr" else share < 0.1, (kind, share)


def test_lr_schedule_warms_up_then_decays():
    warmup, steps = 10, 110
    factors = [lr_factor(s, warmup, steps) for s in range(steps + 1)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:warmup], factors[1:warmup], strict=False))  # linear rise
    assert factors[warmup] == pytest.approx(1.0)
    decay = factors[warmup:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))  # strictly falling
    assert factors[60] == pytest.approx(0.05 + 0.95 * 0.5)  # half way down the cosine
    assert factors[steps] == pytest.approx(0.05)  # ends at 5% of the peak
    assert lr_factor(0, 0, 10) == pytest.approx(1.0)  # no warm-up: starts at the peak


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"crop": 30}, "multiple of 8"),
        ({"crop": 0}, "multiple of 8"),
        ({"loss": "l1"}, "unknown loss"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"batch_size": 0}, "--batch-size"),
        ({"checkpoint_every": 0}, "--checkpoint-every"),
        ({"val_every": 0}, "--val-every"),
        ({"lr": -1.0}, "--lr"),
        ({"ema": 1.0}, "--ema"),
        ({"min_scale": 0.0}, "--min-scale"),
        ({"workers": -1}, "--workers"),
        ({"temperature_steps": -1}, "--temperature-steps"),
        ({"device": "xpu"}, "unknown device"),
    ],
)
def test_bad_options_are_refused(image_folder, tmp_path, change, match):
    with pytest.raises(CodecError, match=match):
        train(options(image_folder, tmp_path / "out" / "w.safetensors", **change), **QUIET)
    assert not (tmp_path / "out").exists()


def test_no_usable_images_and_existing_outputs(image_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.png").write_bytes(b"junk")
    with pytest.raises(CodecError, match="no usable images"):
        train(options(empty, tmp_path / "w.safetensors"), **QUIET)
    (tmp_path / "w.safetensors").write_bytes(b"precious")
    with pytest.raises(CodecError, match="exists; --resume .* or --force"):
        train(options(image_folder, tmp_path / "w.safetensors"), **QUIET)
    assert (tmp_path / "w.safetensors").read_bytes() == b"precious"
    train(options(image_folder, tmp_path / "w.safetensors", steps=2, force=True), **QUIET)
    Autoencoder.from_pretrained(tmp_path / "w.safetensors")


def test_bad_and_small_images_in_the_data_are_skipped_with_a_warning(image_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data / "good")
    (data / "bad.jpg").write_bytes(b"\xff\xd8\xff junk")
    Image.fromarray(smooth_image(8, 8)).save(data / "tiny.png")
    Image.fromarray(smooth_image(20, 24)).save(data / "small.png")  # smaller than the crop: padded
    messages: list[str] = []
    train(options(data, tmp_path / "w.safetensors", steps=3, crop=32, batch_size=5), log=messages.append)
    skipped = [m for m in messages if m.startswith("skipping")]
    assert len(skipped) == 2 and any("bad.jpg" in m for m in skipped) and any("tiny.png" in m for m in skipped)


class PlainMSE(Recipe):
    """The smallest recipe: the loop needs a format, data and a loss, and nothing else."""

    checkpoint_format = "test-plain-mse"

    def __init__(self, opts: TrainOptions) -> None:
        self.opts = opts

    def setup(self, device, log):
        return RandomCrops(usable_images(self.opts.data_dir, warn=log), self.opts.crop, self.opts.seed)

    def loss(self, net, batch, step):
        loss = torch.nn.functional.mse_loss(net(batch), batch)
        return loss, {"loss": loss.item()}


def test_a_new_recipe_gets_the_whole_loop(image_folder, tmp_path):
    """A recipe of a few lines: the time budget stops it, --resume finishes it, checkpoints are its own."""
    opts = options(image_folder, tmp_path / "w.safetensors", steps=4, max_minutes=1e-9)
    stopped = fit(PlainMSE(opts), opts, **QUIET)
    assert not stopped.finished and stopped.steps == 1 and math.isfinite(stopped.metrics["loss"])
    assert torch.load(tmp_path / "w.ckpt", weights_only=True)["format"] == "test-plain-mse"
    Autoencoder.from_pretrained(tmp_path / "w.safetensors")
    with pytest.raises(CodecError, match="exists; --resume"):
        fit(PlainMSE(opts), opts, **QUIET)
    resumed = dataclasses.replace(opts, max_minutes=0.0, resume=tmp_path / "w.ckpt")
    done = fit(PlainMSE(resumed), resumed, **QUIET)
    assert done.finished and done.steps == 4
    with pytest.raises(CodecError, match="not a checkpoint of this model configuration"):
        train(resumed, **QUIET)  # the photo recipe does not take another recipe's checkpoint


def test_quality_levels_train_with_a_rate_term_and_resume(image_folder, tmp_path, tiny_weights):
    from hybrid_codec import Codec, entropy
    from hybrid_codec.train import RateDistortion

    out = tmp_path / "levels.safetensors"
    opts = options(image_folder, out, steps=8, lr=1e-3, init_from=tiny_weights, lambdas="30,300,3000", ema=0)
    result = train(opts, **QUIET)
    assert result.steps == 8 and math.isfinite(result.metrics["bpp"])
    model = Autoencoder.from_pretrained(out)
    assert model.config.quality_levels == 3 and model.rate is None
    steps = model.levels.steps
    assert (steps[:-1] > steps[1:]).all()  # level 1 is the coarsest
    assert (model.levels.tables.sum(-1) == entropy.TOTAL).all()
    codec = Codec(model)
    sizes = [len(codec.compress(image_folder / "img0.png", q)) for q in (1, 2, 3)]
    assert sizes[0] < sizes[1] < sizes[2]

    # the rate term moves the steps: a heavier weight on bits makes a level coarser
    cheap = options(image_folder, tmp_path / "c.safetensors", steps=8, lr=1e-3, init_from=tiny_weights, ema=0)
    cheap = dataclasses.replace(cheap, lambdas="0.001,0.002,0.003")
    trained_cheap = Autoencoder.from_pretrained(train(cheap, **QUIET).out).levels.steps
    assert trained_cheap.log().mean() > steps.log().mean() + 0.05

    # resumed from its checkpoint at step 4, a run ends where an uninterrupted one does
    with one_thread():
        whole = train(
            dataclasses.replace(opts, out=tmp_path / "whole.safetensors", steps=8, checkpoint_every=4), **QUIET
        )
        half = dataclasses.replace(opts, out=tmp_path / "half.safetensors", steps=4, checkpoint_every=4)
        train(half, **QUIET)
        resumed = dataclasses.replace(half, steps=8, resume=half.checkpoint)
        train(resumed, **QUIET)
    a, b = Autoencoder.from_pretrained(whole.out), Autoencoder.from_pretrained(tmp_path / "half.safetensors")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(y.float(), x.float(), rtol=0, atol=1e-5, msg=name)
    with pytest.raises(CodecError, match="not a checkpoint"):
        train(dataclasses.replace(options(image_folder, tmp_path / "p.safetensors"), resume=half.checkpoint), **QUIET)
    assert RateDistortion.checkpoint_format != "hybrid-codec-checkpoint"


@pytest.mark.parametrize("lambdas", ["1,x", "300,30", "-1,2", "0,1"])
def test_bad_lambdas_are_refused(image_folder, tmp_path, lambdas):
    with pytest.raises(CodecError, match="--lambdas"):
        train(options(image_folder, tmp_path / "w.safetensors", lambdas=lambdas), **QUIET)


def test_the_loop_anneals_the_attention_temperature_and_exports_it_at_1(image_folder, tmp_path, monkeypatch):
    seen, loss = [], train_module.Photos.loss

    def spy(self, net, batch, step):
        seen.append([m.temperature for m in net.modules() if isinstance(m, DyConv2d)])
        return loss(self, net, batch, step)

    monkeypatch.setattr(train_module.Photos, "loss", spy)
    model = dataclasses.replace(TINY, family="dycnn", encoder_hidden=2, decoder_hidden=2)
    out = tmp_path / "dy.safetensors"
    train(options(image_folder, out, steps=6, checkpoint_every=6, temperature_steps=4, model=model), **QUIET)
    assert [set(layers) for layers in seen] == [{t} for t in (30.0, 22.75, 15.5, 8.25, 1.0, 1.0)]  # every layer alike
    exported = {m.temperature for m in Autoencoder.from_pretrained(out).modules() if isinstance(m, DyConv2d)}
    assert exported == {1.0}


def test_stages_train_one_half_and_the_decoder_stage_keeps_every_code(image_folder, tmp_path, tiny_weights):
    """--stage decoder fine-tunes the decoder alone for --init-from's files: the encoder, the levels'
    steps and tables are kept, so the same image gets the same bytes, and those bytes decode
    better; --stage encoder keeps the decoder."""
    from hybrid_codec import Codec
    from hybrid_codec.compact import HEADER_BYTES

    levels = options(image_folder, tmp_path / "l.safetensors", steps=4, lr=1e-3, init_from=tiny_weights, ema=0)
    levels = dataclasses.replace(levels, lambdas="30,300,3000")
    start = Autoencoder.from_pretrained(train(levels, **QUIET).out)

    opts = options(image_folder, tmp_path / "d.safetensors", steps=30, init_from=levels.out, ema=0)
    opts = dataclasses.replace(opts, stage="decoder", decoder_min_scale=0.5, loss="psnr", val_dir=image_folder)
    result = train(opts, **QUIET)
    tuned = Autoencoder.from_pretrained(result.out)
    assert tuned.config.quality_levels == 3 and "val_psnr" in result.metrics
    for name, value in {**start.encoder.state_dict(), **start.levels.state_dict()}.items():
        kept = {**tuned.encoder.state_dict(), **tuned.levels.state_dict()}[name]
        assert torch.equal(value, kept), name
    image = image_folder / "img0.png"
    reference = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).float()
    for q in (1, 2, 3):
        files = [Codec(m).compress(image, q) for m in (start, tuned)]
        assert files[0][HEADER_BYTES:] == files[1][HEADER_BYTES:]  # the same payload; the header names the weights
        errors = []
        for model, data in zip((start, tuned), files, strict=True):
            decoded = torch.from_numpy(np.array(Codec(model).decompress(data))).float()
            errors.append((decoded - reference).pow(2).mean())
        assert errors[1] < errors[0], q

    with pytest.raises(CodecError, match="--lambdas"):
        train(dataclasses.replace(opts, lambdas="1,2,3", force=True), **QUIET)
    with pytest.raises(CodecError, match="--init-from"):
        train(dataclasses.replace(opts, init_from=None, force=True), **QUIET)

    # --decoder-levels: the levels shown, each as often as listed, in that order
    from hybrid_codec.data import StoredLatentCrops

    paths = sorted(image_folder.glob("*.png"))
    every, weighted = (StoredLatentCrops(paths, start, 32, 0, [1.0], levels) for levels in ((), (3, 1, 3)))
    assert len(weighted.pairs) == len(every.pairs) == 3 * len(paths)
    assert torch.equal(weighted.pairs[0][1], every.pairs[2][1]) and torch.equal(weighted.pairs[2][1], every.pairs[2][1])
    assert torch.equal(weighted.pairs[1][1], every.pairs[0][1])
    for levels, message in [("1,4", "levels 1 to 3"), ("1;2", "comma-separated"), ("0", "1 or more")]:
        with pytest.raises(CodecError, match=message):
            train(dataclasses.replace(opts, decoder_levels=levels, force=True), **QUIET)
    with pytest.raises(CodecError, match="--stage decoder too"):
        train(dataclasses.replace(opts, stage="both", decoder_levels="1", force=True), **QUIET)

    enc = options(image_folder, tmp_path / "e.safetensors", steps=4, init_from=tiny_weights, stage="encoder", ema=0)
    encoder_only = Autoencoder.from_pretrained(train(enc, **QUIET).out)
    first = Autoencoder.from_pretrained(tiny_weights)
    for name, value in first.decoder.state_dict().items():
        assert torch.equal(value, encoder_only.decoder.state_dict()[name]), name
    assert any(
        not torch.equal(value, encoder_only.encoder.state_dict()[name])
        for name, value in first.encoder.state_dict().items()
    )
