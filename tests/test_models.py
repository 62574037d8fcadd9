"""Encoder/decoder sizes and shapes, the config, and weights files (safetensors, no code executed)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file, save_file

from hybrid_codec.errors import CodecError
from hybrid_codec.models import Autoencoder, CodecConfig, read_weights, weights_bytes


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return Autoencoder(TINY).eval()


def test_default_model_sizes_fit_the_budget():
    model = Autoencoder(CodecConfig())
    assert weights_bytes(model.encoder) <= 100_000
    assert weights_bytes(model.decoder) <= 2_000_000
    params = sum(p.numel() for p in model.encoder.parameters())
    assert weights_bytes(model.encoder) >= 4 * params  # counts every parameter at 4 bytes (plus buffers)


def test_encoder_and_decoder_shapes(tiny_model):
    images = torch.rand(2, 3, 16, 24)
    latents = tiny_model.encoder(images)
    assert latents.shape == (2, 4, 2, 3)
    decoded = tiny_model.decoder(latents)
    assert decoded.shape == (2, 3, 16, 24)
    assert decoded.min() >= 0 and decoded.max() <= 1
    wild = tiny_model.decoder(latents * 1000)  # clamped to [0, 1] whatever the latents
    assert wild.min() >= 0 and wild.max() <= 1
    assert tiny_model(images).shape == images.shape


def test_training_forward_is_unclamped_and_differentiable():
    torch.manual_seed(0)
    model = Autoencoder(TINY).train()
    with torch.no_grad():
        model.decoder.conv.similar_conv.bias.fill_(5.0)  # push the output far above 1
    images = torch.rand(2, 3, 16, 16)
    out = model(images)
    assert out.max() > 1
    out.mean().backward()  # the straight-through quantizer lets gradients reach the encoder
    assert model.encoder.conv.kernel_weight.grad.abs().sum() > 0


def test_config_json_round_trip():
    config = CodecConfig(name="x", latent_space="sd", encoder_hidden=5, decoder_hidden=7, decoder_kernel=5)
    text = config.to_json()
    assert json.loads(text)["decoder_hidden"] == 7
    assert CodecConfig.from_json(text) == config
    assert CodecConfig.from_json(CodecConfig().to_json()) == CodecConfig()


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"encoder_hidden": 4, "colour": 1}', "unknown config fields"),
        ("{not json", "invalid model config"),
        ("[1, 2]", "JSON object"),
        ('"native"', "JSON object"),
        ('{"latent_space": "pixels"}', "unknown latent space"),
        ('{"decoder_kernel": 4}', "odd"),
        ('{"encoder_hidden": 0}', "an integer >= 1"),
        ('{"decoder_hidden": -3}', "an integer >= 1"),
        ('{"encoder_hidden": "12"}', "an integer >= 1"),
        ('{"encoder_hidden": 4.0}', "an integer >= 1"),
        ('{"downscale": true}', "an integer >= 1"),
        ('{"name": 5}', "strings"),
    ],
)
def test_bad_config_refused(text, message):
    with pytest.raises(CodecError, match=message):
        CodecConfig.from_json(text)


def test_config_rebuilds_the_same_architecture():
    config = CodecConfig(encoder_hidden=5, decoder_hidden=6, decoder_kernel=5)
    model = Autoencoder(CodecConfig.from_json(config.to_json()))
    assert model.encoder.conv.hidden == 5
    assert model.decoder.conv.hidden == 6
    assert model.decoder.conv.kernel_size == 5


def test_save_and_load_give_identical_outputs_and_hash(tiny_model, tmp_path):
    path = tiny_model.save_pretrained(tmp_path / "m.safetensors")
    assert path.is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary left
    loaded = Autoencoder.from_pretrained(path)
    assert loaded.config == tiny_model.config
    assert not loaded.training
    assert loaded.weights_hash() == tiny_model.weights_hash()
    images = torch.rand(1, 3, 24, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), tiny_model(images))


def test_weights_hash_depends_on_weights_and_config(tiny_model):
    before = tiny_model.weights_hash()
    assert before == tiny_model.weights_hash()
    assert len(before) == 16
    with torch.no_grad():
        tiny_model.decoder.conv.kernel_bias[0, 0] += 1e-3
    assert tiny_model.weights_hash() != before
    renamed = Autoencoder(dataclasses.replace(TINY, name="other"))
    renamed.load_state_dict(tiny_model.state_dict())
    assert renamed.weights_hash() != tiny_model.weights_hash()


def test_shipped_weight_format_names_its_config(tiny_model, tmp_path):
    path = tiny_model.save_pretrained(tmp_path / "m.safetensors")
    config, tensors = read_weights(path)
    assert config == TINY
    assert set(tensors) == set(tiny_model.state_dict())


def rewrite(source, target, config_text=None, metadata=None, tensors=None):
    tensors = load_file(str(source)) if tensors is None else tensors
    if metadata is None:
        metadata = {"format": "hybrid-codec-weights", "config": config_text}
    save_file(tensors, str(target), metadata=metadata)
    return target


@pytest.mark.parametrize(
    "change,message",
    [
        ({"encoder_hidden": 5}, "do not match their config"),
        ({"latent_channels": 3}, "do not match their config"),
        ({"decoder_kernel": 5}, "do not match their config"),
        ({"encoder_hidden": "4"}, "an integer >= 1"),
        ({"extra": 1}, "unknown config fields"),
    ],
)
def test_tampered_config_refused(tiny_model, tmp_path, change, message):
    source = tiny_model.save_pretrained(tmp_path / "m.safetensors")
    config = {**json.loads(TINY.to_json()), **change}
    path = rewrite(source, tmp_path / "bad.safetensors", json.dumps(config))
    with pytest.raises(CodecError, match=message):
        Autoencoder.from_pretrained(path)


def test_missing_or_extra_tensor_refused(tiny_model, tmp_path):
    source = tiny_model.save_pretrained(tmp_path / "m.safetensors")
    tensors = load_file(str(source))
    missing = dict(tensors)
    del missing["encoder.conv.kernel_bias"]
    with pytest.raises(CodecError, match="do not match"):
        Autoencoder.from_pretrained(rewrite(source, tmp_path / "a.safetensors", TINY.to_json(), tensors=missing))
    extra = {**tensors, "surprise": torch.zeros(2)}
    with pytest.raises(CodecError, match="do not match"):
        Autoencoder.from_pretrained(rewrite(source, tmp_path / "b.safetensors", TINY.to_json(), tensors=extra))


def test_non_safetensors_file_refused(tmp_path):
    for name, data in [("random.bin", bytes(range(256)) * 8), ("empty.bin", b""), ("text.txt", b"hello weights\n")]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CodecError, match="not a safetensors weights file"):
            Autoencoder.from_pretrained(path)


def test_pytorch_checkpoint_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(Autoencoder(TINY).state_dict(), path)
    with pytest.raises(CodecError, match="not a safetensors weights file"):
        Autoencoder.from_pretrained(path)


def test_safetensors_without_our_metadata_refused(tiny_model, tmp_path):
    source = tiny_model.save_pretrained(tmp_path / "m.safetensors")
    for i, metadata in enumerate([{}, {"format": "pt"}, {"format": "hybrid-codec-weights"}]):
        path = rewrite(source, tmp_path / f"plain{i}.safetensors", metadata=metadata)
        with pytest.raises(CodecError, match="not hybrid-codec weights"):
            Autoencoder.from_pretrained(path)


def test_truncated_weights_file_refused(tiny_model, tmp_path):
    data = tiny_model.save_pretrained(tmp_path / "m.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    for length in [1, 7, 8, 9, 100, len(data) // 3, len(data) // 2, len(data) - 1]:
        path.write_bytes(data[:length])
        with pytest.raises(CodecError, match="not a safetensors weights file"):
            Autoencoder.from_pretrained(path)


def test_missing_weights_file_refused(tmp_path):
    with pytest.raises(CodecError, match="no such weights file"):
        Autoencoder.from_pretrained(tmp_path / "nothing.safetensors")
    with pytest.raises(CodecError, match="is a folder, not a weights file"):
        Autoencoder.from_pretrained(tmp_path)


def test_loading_weights_never_unpickles(tiny_model, tmp_path, monkeypatch):
    path = tiny_model.save_pretrained(tmp_path / "m.safetensors")

    def forbidden(*args, **kwargs):
        raise AssertionError("loading weights must not unpickle anything")

    for module, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    loaded = Autoencoder.from_pretrained(path)
    assert loaded.weights_hash() == tiny_model.weights_hash()
