"""`hybrid-codec distill`, run for real: a tiny diffusers AutoencoderKL teacher, and precomputed tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_sd import tiny_kl
from typer.testing import CliRunner

from hybrid_codec.cli import app
from hybrid_codec.data import scaled_pixels
from hybrid_codec.distill import TileCrops, find_tiles, folder_scale, relative_errors
from hybrid_codec.errors import CodecError
from hybrid_codec.models import Autoencoder

runner = CliRunner()
SMALL = ["--encoder-hidden", "4", "--decoder-hidden", "4", "--device", "cpu", "--batch-size", "2"]


def one_error_line(result) -> str:
    """Exit code 1 and one error line, last; warnings (yellow lines, e.g. skipped files) may come before it."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, result.output
    return lines[-1]


def pooled_target(pixels: np.ndarray) -> np.ndarray:
    """A learnable stand-in for SD latents: 8x8 means of RGB and of brightness, at SD-like scales."""
    h, w = pixels.shape[0] // 8, pixels.shape[1] // 8
    means = pixels[: h * 8, : w * 8].astype(np.float32).reshape(h, 8, w, 8, 3).mean((1, 3)) / 255
    channels = [means[..., 0] * 5, means[..., 1] * 4 - 2, means[..., 2] * 3, means.mean(-1) * -2]
    return np.stack(channels).astype(np.float32)


@pytest.fixture
def tiles(tmp_path, image_folder):
    """64x64 tiles every 32 px of each image, in the shared teacher folder's naming."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    for path in sorted(image_folder.glob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        for top in range(0, pixels.shape[0] - 63, 32):
            for left in range(0, pixels.shape[1] - 63, 32):
                tile = pixels[top : top + 64, left : left + 64]
                np.save(folder / f"{path.stem}_y{top}_x{left}.npy", pooled_target(tile))
    (folder / "notes.npy").write_bytes(b"")  # not a tile name: skipped with a warning
    return folder


def test_tile_crops_are_aligned_pairs(tiles, image_folder):
    found = find_tiles(tiles, sorted(image_folder.glob("*.png")), warn=lambda m: None)
    assert len(found) > 8 and all(t.top % 32 == 0 and t.left % 32 == 0 for t in found)
    crops = TileCrops(found, 32, seed=0)
    for i in range(6):
        image, target, variance = crops[i]
        assert image.shape == (3, 32, 32) and target.shape == (4, 4, 4)
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        np.testing.assert_allclose(target.numpy(), pooled_target(pixels), atol=1e-5)
        whole = [t for _, t in crops.pairs if np.isin(target.numpy(), t).all()]  # the tile it was cut from
        assert any(np.allclose(variance.numpy(), t.reshape(4, -1).var(1)) for t in whole)


def test_relative_errors_are_tile_by_tile():
    """The teacher README's metric: each tile's MSE over that tile's own variance, per channel."""
    targets = torch.stack([torch.randn(4, 8, 8), 10 * torch.randn(4, 8, 8)])
    latents = targets + 0.5 * torch.randn_like(targets)
    errors = relative_errors(latents, targets)
    for b in range(2):
        for c in range(4):
            expected = ((latents[b, c] - targets[b, c]) ** 2).mean() / targets[b, c].var(unbiased=False)
            assert errors[b, c].item() == pytest.approx(expected.item(), rel=1e-5)
    assert errors[1].mean() < errors[0].mean() / 10  # the same noise on a busier tile is a smaller error


def test_scaled_tile_folders(tmp_path, image_folder, tiles):
    """A folder named <x>-sNNN holds tiles of the images at N.NN: its pixels are the resized image's."""
    assert folder_scale(Path("photos-s065")) == 0.65 and folder_scale(Path("photos")) == 1.0
    scaled = tiles.parent / "teacher" / "tiles-s050"
    scaled.mkdir(parents=True)
    pixels = scaled_pixels(image_folder / "img0.png", 0.5)
    np.save(scaled / "img0_y0_x0.npy", pooled_target(pixels[:32, :32]))
    found = find_tiles(tiles.parent / "teacher", sorted(image_folder.glob("*.png")), warn=lambda m: None)
    assert [(t.image.name, t.scale) for t in found] == [("img0.png", 0.5)]
    image, target = TileCrops(found, 8, seed=0).whole()[0]
    assert image.shape == (3, 32, 32)
    np.testing.assert_allclose(target.numpy(), pooled_target(pixels[:32, :32]), atol=1e-6)


def test_distill_from_tiles_validates_and_resumes(tmp_path, image_folder, tiles):
    out = tmp_path / "sd.safetensors"
    args = ["distill", str(image_folder), "--out", str(out), "--teacher-latents", str(tiles), "--holdout", "1"]
    args += [*SMALL, "--crop", "32", "--val-every", "2", "--checkpoint-every", "2"]
    result = runner.invoke(app, [*args, "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert "distilled 3 steps" in result.output and "validation latent rel. error" in result.output
    model = Autoencoder.from_pretrained(out)
    assert model.config.latent_space == "sd" and model.config.name == "sd"
    checkpoint = tmp_path / "sd.ckpt"
    assert checkpoint.is_file()

    resumed = runner.invoke(app, [*args, "--steps", "5", "--resume", str(checkpoint)])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output and "distilled 5 steps" in resumed.output
    line = one_error_line(runner.invoke(app, [*args, "--steps", "5", "--resume", str(checkpoint)]))
    assert "already at step 5" in line
    assert "--force" in one_error_line(runner.invoke(app, [*args, "--steps", "5"]))  # no overwrite by accident


def test_distill_learns_the_tile_targets(tmp_path, image_folder, tiles):
    """Enough steps on an easy target bring the latent relative error well below 1 (predicting the mean)."""
    from hybrid_codec.distill import distill
    from hybrid_codec.options import DistillOptions, sd_config

    opts = DistillOptions(
        data_dir=image_folder,
        out=tmp_path / "sd.safetensors",
        teacher_latents=tiles,
        holdout=1,
        steps=60,
        batch_size=4,
        crop=32,
        lr=5e-3,
        warmup=5,
        ema=0.9,
        val_every=60,
        device="cpu",
        model=sd_config(encoder_hidden=4, decoder_hidden=4),
    )
    result = distill(opts, log=lambda m: None)
    assert result.finished and result.val["val_latent_rel"] < 0.5


def test_distill_with_a_live_tiny_sd_vae_teacher(tmp_path, image_folder):
    teacher = tiny_kl(tmp_path / "vae")
    out = tmp_path / "student.safetensors"
    args = ["distill", str(image_folder), "--out", str(out), "--teacher", str(teacher), *SMALL]
    result = runner.invoke(app, [*args, "--steps", "2", "--crop", "32", "--holdout", "1", "--val-every", "2"])
    assert result.exit_code == 0, result.output
    assert "validation latent rel. error" in result.output
    assert Autoencoder.from_pretrained(out).config.latent_space == "sd"


def test_distill_bad_inputs_are_one_clear_line(tmp_path, image_folder, tiles):
    out = str(tmp_path / "x.safetensors")
    base = ["distill", str(image_folder), "--out", out, *SMALL, "--steps", "1", "--crop", "32"]
    assert "not both" in one_error_line(runner.invoke(app, [*base, "--teacher", "x", "--teacher-latents", str(tiles)]))
    line = one_error_line(runner.invoke(app, [*base]))  # the default Hub teacher, offline in tests
    assert (
        "stabilityai/sd-vae-ft-mse" in line
        and "--teacher /path" in line
        and "--vae" not in line
        and "hf download" in line
    )
    empty = tmp_path / "none"
    empty.mkdir()
    assert "no <image>_y<Y>_x<X>.npy tiles" in one_error_line(
        runner.invoke(app, [*base, "--teacher-latents", str(empty)])
    )
    assert "multiple of 8" in one_error_line(
        runner.invoke(app, [*base, "--teacher-latents", str(tiles), "--crop", "30"])
    )
    assert "smaller than --crop" in one_error_line(
        runner.invoke(app, [*base, "--teacher-latents", str(tiles), "--crop", "128"])
    )
    np.save(tiles / "img0_y64_x96.npy", np.zeros((4, 8, 8), np.float32))  # 64x64 at x=96 leaves a 128-wide image
    assert "does not fit" in one_error_line(runner.invoke(app, [*base, "--teacher-latents", str(tiles)]))


def test_find_tiles_refuses_ambiguous_stems(tmp_path, image_folder, tiles):
    other = tmp_path / "more"
    other.mkdir()
    Image.open(image_folder / "img0.png").save(other / "img0.jpg")
    with pytest.raises(CodecError, match="two images are named"):
        find_tiles(tiles, [image_folder / "img0.png", other / "img0.jpg"])


def test_sd_teacher_must_give_sd_shaped_latents(tmp_path, image_folder):
    """A VAE with another downscale is refused with a clear line, not a shape error deep in the loss."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4).save_pretrained(tmp_path / "flat")
    args = ["distill", str(image_folder), "--out", str(tmp_path / "y.safetensors"), *SMALL, "--steps", "1"]
    line = one_error_line(runner.invoke(app, [*args, "--crop", "32", "--teacher", str(tmp_path / "flat")]))
    assert "not an SD VAE" in line


def check_sd_levels(model: Autoencoder, image_folder: Path) -> None:
    """An encoder stage's quality levels: steps that are fixed fractions of each channel's spread over
    the training photos' latents, coarse to fine, whose files round-trip and grow with the level."""
    from hybrid_codec import compact
    from hybrid_codec.codec import Codec
    from hybrid_codec.options import SD_LEVELS, SD_STEP_RANGE

    assert model.config.quality_levels == SD_LEVELS and model.levels is not None
    ratios = model.levels.steps / model.levels.steps[0]  # the same ladder for every channel
    expected = torch.from_numpy(np.geomspace(*SD_STEP_RANGE, SD_LEVELS) / SD_STEP_RANGE[0]).float()
    torch.testing.assert_close(ratios, expected[:, None].expand_as(ratios))
    codec = Codec(model)
    image = Image.open(image_folder / "img1.png").convert("RGB")
    sizes, errors = [], []
    for level in range(1, SD_LEVELS + 1):
        data = codec.compress(image, level)
        assert compact.unpack(data).level == level
        latent = codec.load(data)
        assert torch.equal(latent.codes, codec.encode(image, level).codes)
        exact = codec.encode_tensor(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None])[0]
        sizes.append(len(data))
        errors.append(float((latent.dequantize()[0] - exact).abs().max() / model.levels.steps[level - 1].max()))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert max(errors) <= 0.5 + 1e-4  # rounding to the level's step, no more


def test_stages_train_one_half_and_keep_the_other(tmp_path, image_folder, tiles):
    """--stage encoder leaves the decoder as --init-from had it; --stage decoder the encoder, and it
    trains on the latents its files hold (so its round trip improves)."""
    from hybrid_codec.codec import Codec
    from hybrid_codec.distill import distill
    from hybrid_codec.options import DistillOptions, sd_config

    common = dict(data_dir=image_folder, teacher_latents=tiles, holdout=1, batch_size=4, crop=32, lr=5e-3)
    common.update(warmup=2, ema=0.0, device="cpu", model=sd_config(encoder_hidden=4, decoder_hidden=4))
    first = distill(DistillOptions(out=tmp_path / "a.safetensors", steps=4, **common), log=lambda m: None)
    start = Autoencoder.from_pretrained(first.out)

    enc = DistillOptions(out=tmp_path / "e.safetensors", steps=4, stage="encoder", init_from=first.out, **common)
    encoder_only = Autoencoder.from_pretrained(distill(enc, log=lambda m: None).out)
    for name, value in start.decoder.state_dict().items():
        assert torch.equal(value, encoder_only.decoder.state_dict()[name]), name
    assert not torch.equal(start.encoder.conv.similar_conv.weight, encoder_only.encoder.conv.similar_conv.weight)
    check_sd_levels(encoder_only, image_folder)

    dec = DistillOptions(out=tmp_path / "d.safetensors", steps=30, stage="decoder", init_from=enc.out, **common)
    dec.decoder_min_scale = 0.5
    decoder_only = Autoencoder.from_pretrained(distill(dec, log=lambda m: None).out)
    for name, value in encoder_only.encoder.state_dict().items():
        assert torch.equal(value, decoder_only.encoder.state_dict()[name]), name
    for name, value in encoder_only.levels.state_dict().items():  # the same codes, the same tables
        assert torch.equal(value, decoder_only.levels.state_dict()[name]), name
    image = torch.from_numpy(np.array(Image.open(image_folder / "img0.png").convert("RGB"))).permute(2, 0, 1)
    before, after = (Codec(m).roundtrip_tensor(image[None]) for m in (encoder_only, decoder_only))
    target = image[None].float() / 255
    assert F.mse_loss(after, target) < F.mse_loss(before, target)

    wider = DistillOptions(out=tmp_path / "w.safetensors", steps=2, stage="encoder", init_from=enc.out, **common)
    wider.model = sd_config(encoder_hidden=5, decoder_hidden=4)  # another encoder size: only the decoder is taken
    grown = Autoencoder.from_pretrained(distill(wider, log=lambda m: None).out)
    assert grown.config.encoder_hidden == 5 and grown.encoder.conv.dense1.weight.shape[1] == 5
    for name, value in encoder_only.decoder.state_dict().items():
        assert torch.equal(value, grown.decoder.state_dict()[name]), name
    wider.model, wider.out, wider.stage = (
        sd_config(encoder_hidden=5, decoder_hidden=5),
        tmp_path / "v.safetensors",
        "both",
    )
    with pytest.raises(CodecError, match="differs"):  # the decoder must match, and any other stage takes it all
        distill(wider, log=lambda m: None)

    args = ["distill", str(image_folder), "--out", str(tmp_path / "x.safetensors"), *SMALL, "--stage", "decoder"]
    assert "--init-from" in one_error_line(runner.invoke(app, [*args, "--teacher-latents", str(tiles)]))
