"""Stable Diffusion pairing, run for real on tiny randomly initialised diffusers VAEs saved to disk."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import smooth_image
from PIL import Image
from typer.testing import CliRunner

from hybrid_codec.cli import app
from hybrid_codec.codec import Codec
from hybrid_codec.errors import CodecError
from hybrid_codec.models import Autoencoder, CodecConfig

runner = CliRunner()
TINY_SD = CodecConfig(name="tinysd", latent_space="sd", encoder_hidden=4, decoder_hidden=4)


def tiny_kl(folder):
    """A 4-level (8x) AutoencoderKL with 8 channels: the SD VAE's shape at a few KB."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    vae.save_pretrained(folder)
    return folder


def tiny_taesd(folder):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    return {"sd": tiny_kl(root / "kl"), "taesd": tiny_taesd(root / "taesd")}


@pytest.fixture
def sd_weights(tmp_path):
    torch.manual_seed(1)
    return Autoencoder(TINY_SD).save_pretrained(tmp_path / "tinysd.safetensors")


@pytest.fixture
def sd_latent_file(tmp_path, sd_weights):
    """An SD-space latent file of a 37x45 image (not a multiple of 8: decoding must crop)."""
    Image.fromarray(smooth_image(37, 45)).save(tmp_path / "small.png")
    result = runner.invoke(app, ["encode", str(tmp_path / "small.png"), "-m", str(sd_weights)])
    assert result.exit_code == 0, result.output
    return tmp_path / "small.latent.pt"


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("decoder", ["sd", "taesd"])
def test_decode_latent_file_with_sd_vae(tmp_path, vaes, sd_latent_file, decoder):
    out = tmp_path / f"{decoder}.png"
    result = runner.invoke(
        app, ["decode", str(sd_latent_file), "--decoder", decoder, "--vae", str(vaes[decoder]), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (45, 37) and image.mode == "RGB"


def test_sd_vae_decode_matches_diffusers(vaes, sd_latent_file):
    """The file decode is AutoencoderKL.decode of the dequantized raw latent, mapped from [-1, 1]."""
    from diffusers import AutoencoderKL

    from hybrid_codec.bitstream import Latent
    from hybrid_codec.sd import LatentFileDecoder

    latent = Latent.load(sd_latent_file)
    vae = AutoencoderKL.from_pretrained(vaes["sd"]).eval()
    with torch.no_grad():
        expected = ((vae.decode(latent.dequantize()).sample + 1) / 2).clamp(0, 1)[0, :, :37, :45]
    got = np.asarray(LatentFileDecoder("sd", vaes["sd"], device="cpu").decode(sd_latent_file)).astype(np.float32)
    assert np.abs(got - expected.permute(1, 2, 0).numpy() * 255).max() <= 1.0


def test_sd_vae_decodes_compact_files_with_the_tables_of_their_weights(tmp_path, vaes):
    """A quality-level file of an sd model is entropy-decoded with its weights' tables (--model for
    weights that are not shipped), then decoded by the VAE like any SD latent."""
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    model = Autoencoder(dataclasses.replace(TINY_SD, quality_levels=3))
    model.levels.steps.copy_(torch.tensor([[0.4], [0.2], [0.1]]).expand(3, 4))
    weights = model.save_pretrained(tmp_path / "levels.safetensors")
    Image.fromarray(smooth_image(37, 45)).save(tmp_path / "small.png")
    result = runner.invoke(app, ["encode", str(tmp_path / "small.png"), "-m", str(weights), "-q", "2"])
    assert result.exit_code == 0, result.output
    source, out = tmp_path / "small.hyb", tmp_path / "vae.png"
    args = ["decode", str(source), "--decoder", "sd", "--vae", str(vaes["sd"]), "-o", str(out)]
    line = one_error_line(runner.invoke(app, args))  # whose tables? not a shipped model's
    assert "--model" in line and not out.exists()
    result = runner.invoke(app, [*args, "-m", str(weights)])
    assert result.exit_code == 0, result.output

    latent = Codec(Autoencoder.from_pretrained(weights)).load(source)
    assert latent.level == 2 and latent.latent_space == "sd"
    vae = AutoencoderKL.from_pretrained(vaes["sd"]).eval()
    with torch.no_grad():
        expected = ((vae.decode(latent.dequantize()).sample + 1) / 2).clamp(0, 1)[0, :, :37, :45]
    got = np.asarray(Image.open(out).convert("RGB")).astype(np.float32)
    assert np.abs(got - expected.permute(1, 2, 0).numpy() * 255).max() <= 1.0


def test_native_latents_refused_by_sd_decoder(tmp_path, vaes, tiny_weights):
    Image.fromarray(smooth_image(32, 32)).save(tmp_path / "a.png")
    assert runner.invoke(app, ["encode", str(tmp_path / "a.png"), "-m", str(tiny_weights)]).exit_code == 0
    result = runner.invoke(app, ["decode", str(tmp_path / "a.latent.pt"), "--decoder", "sd", "--vae", str(vaes["sd"])])
    line = one_error_line(result)
    assert "'native' latent space" in line and "--decoder hybrid" in line
    assert not (tmp_path / "a.decoded.png").exists()


@pytest.mark.parametrize("vae", [None, "hybrid-codec-tests/no-such-vae"])
def test_offline_hub_id_is_one_clear_line(sd_latent_file, vae):
    began = time.monotonic()
    args = ["decode", str(sd_latent_file), "--decoder", "sd"] + (["--vae", vae] if vae else [])
    line = one_error_line(runner.invoke(app, args))
    assert time.monotonic() - began < 30
    assert (vae or "stabilityai/sd-vae-ft-mse") in line and "--vae /path/to/folder" in line
    assert "HF_HUB_OFFLINE" in line


def test_bad_vae_paths_are_one_clear_line(tmp_path, sd_latent_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(runner.invoke(app, ["decode", str(sd_latent_file), "--decoder", "sd", "--vae", str(empty)]))
    assert "local folder" in line and str(empty) in line
    missing = tmp_path / "nope" / "vae"
    line = one_error_line(runner.invoke(app, ["decode", str(sd_latent_file), "--decoder", "sd", "--vae", str(missing)]))
    assert "no such VAE folder" in line
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    line = one_error_line(runner.invoke(app, ["decode", str(sd_latent_file), "--decoder", "sd", "--vae", str(junk)]))
    assert "could not load" in line


def test_decode_option_conflicts(sd_latent_file, sd_weights):
    line = one_error_line(runner.invoke(app, ["decode", str(sd_latent_file), "--vae", "x"]))
    assert "--vae goes with" in line
    line = one_error_line(runner.invoke(app, ["decode", str(sd_latent_file), "--decoder", "big"]))
    assert "unknown --decoder" in line


def test_encode_latents_shape_and_scaling(tmp_path, sd_weights):
    from hybrid_codec.sd import SD_SCALING_FACTOR, encode_latents

    array = smooth_image(40, 48)
    raw = encode_latents(array, scaled=False, model=sd_weights, device="cpu")
    assert raw.shape == (1, 4, 5, 6) and raw.dtype == torch.float32
    scaled = encode_latents(array, model=sd_weights, device="cpu")
    torch.testing.assert_close(scaled, raw * SD_SCALING_FACTOR)
    expected = Codec(Autoencoder.from_pretrained(sd_weights)).encode_tensor(
        torch.from_numpy(array).permute(2, 0, 1)[None] / 255
    )
    torch.testing.assert_close(raw, expected)

    Image.fromarray(array).save(tmp_path / "a.png")
    mixed = [tmp_path / "a.png", Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1) / 255.0]
    batch = encode_latents(mixed, scaled=False, batch_size=3, model=sd_weights, device="cpu")
    assert batch.shape == (4, 4, 5, 6)
    torch.testing.assert_close(batch, raw.expand(4, -1, -1, -1))
    assert encode_latents(smooth_image(37, 45), model=sd_weights, device="cpu").shape == (1, 4, 5, 6)

    with pytest.raises(CodecError, match="differ in size"):
        encode_latents([array, smooth_image(48, 48)], model=sd_weights, device="cpu")


def test_encode_latents_refuses_native_models(tiny_weights):
    from hybrid_codec.sd import encode_latents

    with pytest.raises(CodecError, match="'native' latent space"):
        encode_latents(smooth_image(16, 16), model=tiny_weights, device="cpu")


def test_decode_latents_hybrid_and_vae(vaes, sd_weights):
    from diffusers import AutoencoderKL

    from hybrid_codec.sd import decode_latents, encode_latents, load_vae

    latents = encode_latents([smooth_image(32, 40, seed=s) for s in range(2)], model=sd_weights, device="cpu")
    images = decode_latents(latents, vae="hybrid", model=sd_weights, device="cpu")
    assert [image.size for image in images] == [(40, 32)] * 2
    # the hybrid decoder sees the raw latents: the same as decoding them with the codec directly
    codec = Codec(Autoencoder.from_pretrained(sd_weights))
    direct = codec.decode_tensor(latents / 0.18215)[0]
    assert np.abs(np.asarray(images[0], np.float32) - direct.permute(1, 2, 0).numpy() * 255).max() <= 1.0

    by_path = decode_latents(latents[0], vae=vaes["sd"], device="cpu")
    loaded = AutoencoderKL.from_pretrained(vaes["sd"]).eval()
    by_object = decode_latents(latents[:1], vae=loaded)
    assert by_path[0].size == (40, 32)
    assert np.abs(np.asarray(by_path[0], np.int16) - np.asarray(by_object[0], np.int16)).max() <= 1
    taesd = load_vae("taesd", vaes["taesd"], device="cpu")
    assert [image.size for image in decode_latents(latents, vae=taesd)] == [(40, 32)] * 2
    with pytest.raises(CodecError, match="SD latents"):
        decode_latents(torch.zeros(1, 3, 4, 4), vae="hybrid", model=sd_weights)


def test_sd_latents_safetensors_and_resume(tmp_path, image_folder, sd_weights):
    from safetensors import safe_open

    out = tmp_path / "latents.safetensors"
    args = ["sd-latents", str(image_folder), "--out", str(out), "-m", str(sd_weights), "--batch-size", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 4 latents" in result.output
    with safe_open(str(out), framework="pt") as f:
        assert sorted(f.keys()) == [f"img{i}.png" for i in range(4)]
        assert f.metadata()["scaled"] == "true" and f.metadata()["model"] == "tinysd"
        assert tuple(f.get_tensor("img1.png").shape) == (4, 14, 16)  # 112 x 128
    assert not (tmp_path / ".latents.safetensors.parts").exists()

    Image.fromarray(smooth_image(64, 64, seed=9)).save(image_folder / "new.png")
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "wrote 1 latents" in again.output and "4 already there" in again.output
    with safe_open(str(out), framework="pt") as f:
        assert len(f.keys()) == 5

    line = one_error_line(runner.invoke(app, [*args, "--raw"]))
    assert "other settings" in line and "--restart" in line
    assert runner.invoke(app, [*args, "--raw", "--restart"]).exit_code == 0


def test_sd_latents_npy_folder_resumes(tmp_path, image_folder, sd_weights):
    from hybrid_codec.sd import encode_latents

    out = tmp_path / "npy"
    args = ["sd-latents", str(image_folder), "--out", str(out), "-m", str(sd_weights), "--raw"]
    assert runner.invoke(app, args).exit_code == 0
    assert sorted(p.name for p in out.glob("*.npy")) == [f"img{i}.npy" for i in range(4)]
    saved = np.load(out / "img2.npy")
    expected = encode_latents(image_folder / "img2.png", scaled=False, model=sd_weights, device="cpu")[0]
    np.testing.assert_allclose(saved, expected.numpy(), rtol=1e-5, atol=1e-5)

    (out / "img2.npy").unlink()
    (image_folder / "broken.png").write_bytes(b"not a png")
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "wrote 1 latents" in result.output and "3 already there" in result.output
    assert "broken.png" in result.output and "1 of 5 images failed" in result.output
    assert (out / "img2.npy").is_file() and not list(out.glob(".*tmp"))


def test_plain_paths_never_import_diffusers(tmp_path, tiny_weights):
    """encode / decode / info / roundtrip must not pay for importing diffusers."""
    Image.fromarray(smooth_image(24, 24)).save(tmp_path / "a.png")
    script = f"""
import sys
from typer.testing import CliRunner
import hybrid_codec, hybrid_codec.sd, hybrid_codec.distill, hybrid_codec.sd_dataset
from hybrid_codec.cli import app
run = CliRunner().invoke
for args in (["encode", {str(tmp_path / "a.png")!r}, "-m", {str(tiny_weights)!r}],
             ["decode", {str(tmp_path / "a.latent.pt")!r}, "-m", {str(tiny_weights)!r}],
             ["info", {str(tmp_path / "a.latent.pt")!r}],
             ["roundtrip", {str(tmp_path / "a.png")!r}, "-m", {str(tiny_weights)!r}]):
    result = run(app, args)
    assert result.exit_code == 0, result.output
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers", "huggingface_hub"))
assert not loaded, loaded
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_scaled_latents_pass_through_the_img2img_preprocessing(sd_weights):
    """StableDiffusionImg2ImgPipeline(image=latents): its VaeImageProcessor keeps 4-channel tensors as they are,
    and `prepare_latents` uses them as the (scaled) initial latents. The full pipeline needs transformers and
    SD weights, which the tests do not have; this checks the step that decides how our tensor is read."""
    from diffusers.image_processor import VaeImageProcessor

    from hybrid_codec.sd import encode_latents

    latents = encode_latents(smooth_image(64, 48), model=sd_weights, device="cpu")
    processed = VaeImageProcessor(vae_scale_factor=8).preprocess(latents)
    assert processed.shape == latents.shape and torch.equal(processed, latents)


def test_shipped_sd_weights_are_small_and_in_sd_space():
    from hybrid_codec.codec import load_codec
    from hybrid_codec.metrics import psnr
    from hybrid_codec.models import weights_bytes

    codec = load_codec("sd", device="cpu")
    assert codec.config.latent_space == "sd" and codec.name == "sd"
    assert weights_bytes(codec.model.encoder) <= 100_000 and weights_bytes(codec.model.decoder) <= 2_000_000
    image = torch.from_numpy(smooth_image(64, 80)).permute(2, 0, 1)[None] / 255.0
    latents = codec.encode_tensor(image)
    # raw SD space: channel means and spreads of the order of the SD VAE's (about 5, 3, 0, -2.5; std 2-4)
    assert latents.abs().mean() > 0.5 and latents.std() > 0.5
    assert psnr(image, codec.roundtrip_tensor(image)) > 18
