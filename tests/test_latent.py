"""Latent files: round trip, every field validated, tampered/truncated/foreign files refused."""

from __future__ import annotations

import io
import math
import pickle
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from hybrid_codec.bitstream import FORMAT, VERSION, Latent
from hybrid_codec.codec import Codec
from hybrid_codec.compact import MAX_LATENT_VALUES
from hybrid_codec.errors import CodecError
from hybrid_codec.models import Autoencoder
from hybrid_codec.quantize import LEVELS, dequantize, fake_quantize, quantize

FIELDS = ("format", "version", "model", "weights", "latent_space", "height", "width", "shape", "bits", "low", "step")
FIELDS += ("coding", "payload")


def as_payload(data: bytes) -> torch.Tensor:
    """Bytes as the file stores them: a flat uint8 tensor."""
    return torch.tensor(list(data), dtype=torch.uint8)


def make_latent(channels=4, h=3, w=5, height=20, width=37, seed=0) -> Latent:
    gen = torch.Generator().manual_seed(seed)
    return Latent(
        codes=torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=gen),
        low=torch.randn(channels, generator=gen),
        step=torch.rand(channels, generator=gen) + 0.01,
        height=height,
        width=width,
        model="tiny",
        weights="0123456789abcdef",
        latent_space="sd",
    )


def assert_same(a: Latent, b: Latent) -> None:
    assert torch.equal(a.codes, b.codes) and a.codes.dtype == b.codes.dtype == torch.uint8
    assert torch.equal(a.low, b.low) and torch.equal(a.step, b.step)
    assert (a.height, a.width, a.model, a.weights, a.latent_space) == (
        b.height,
        b.width,
        b.model,
        b.weights,
        b.latent_space,
    )


def saved(fields) -> bytes:
    buffer = io.BytesIO()
    torch.save(fields, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def test_bytes_round_trip_keeps_every_field():
    latent = make_latent()
    again = Latent.from_bytes(latent.to_bytes())
    assert_same(latent, again)
    torch.testing.assert_close(again.dequantize(), latent.dequantize(), rtol=0, atol=0)


def test_file_round_trip_keeps_every_field(tmp_path):
    latent = make_latent(channels=3, h=1, w=1, height=1, width=8)
    path = latent.save(tmp_path / "a.latent.pt")
    assert_same(latent, Latent.load(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.latent.pt"]  # no temporary left behind
    assert_same(latent, Latent.load(str(path)))


def test_file_holds_the_documented_fields_as_plain_values():
    latent = make_latent()
    fields = torch.load(io.BytesIO(latent.to_bytes()), weights_only=True)
    assert set(fields) == set(FIELDS)
    assert fields["format"] == FORMAT and fields["version"] == VERSION
    assert fields["shape"] == [4, 3, 5] and fields["bits"] == 8
    assert (fields["height"], fields["width"]) == (20, 37)
    assert fields["low"] == [float(v) for v in latent.low]
    assert fields["payload"].dtype == torch.uint8 and fields["payload"].dim() == 1
    assert all(type(v) in (str, int, list, torch.Tensor) for v in fields.values())


def test_smooth_latent_compresses():
    codes = torch.arange(64, dtype=torch.uint8).repeat(4, 64, 1)  # a ramp along every row
    latent = Latent(codes, torch.zeros(4), torch.ones(4), 512, 512, "tiny", "0" * 16)
    data = latent.to_bytes()
    assert len(data) < codes.numel() / 4
    assert torch.equal(Latent.from_bytes(data).codes, codes)


def test_quantization_error_at_most_half_a_step():
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(3, 4, 9, 7, generator=gen) * torch.tensor([0.01, 1.0, 30.0, 500.0]).view(1, 4, 1, 1)
    latent[1, 2] = 3.25  # a constant channel: step 1, exact
    codes, low, step = quantize(latent)
    assert codes.dtype == torch.uint8 and codes.shape == latent.shape
    assert low.shape == step.shape == (3, 4)
    assert torch.all(step > 0)
    error = (dequantize(codes, low, step) - latent).abs()
    bound = step[..., None, None] / 2 * (1 + 1e-5) + 1e-6 * latent.abs().amax((2, 3), keepdim=True)
    assert torch.all(error <= bound)
    assert torch.all(error[1, 2] == 0)
    per_channel = codes.flatten(2)
    varying = torch.ones(3, 4, dtype=torch.bool)
    varying[1, 2] = False
    assert torch.all(per_channel.amin(-1)[varying] == 0)
    assert torch.all(per_channel.amax(-1)[varying] == LEVELS - 1)


def test_fake_quantize_is_the_round_trip_with_straight_through_gradient():
    latent = (torch.randn(2, 4, 3, 3) * 5).requires_grad_()
    out = fake_quantize(latent)
    torch.testing.assert_close(out.detach(), dequantize(*quantize(latent)), rtol=0, atol=1e-6)
    out.sum().backward()
    assert torch.equal(latent.grad, torch.ones_like(latent))


# ---- every field validated -----------------------------------------------------------------------


def good_fields() -> dict:
    return make_latent().to_dict()  # shape [4, 3, 5], height 20, width 37


@pytest.mark.parametrize("name", [n for n in FIELDS if n not in ("format", "version")])
def test_missing_field_refused(name):
    fields = good_fields()
    del fields[name]
    with pytest.raises(CodecError, match=f"no '{name}' field"):
        Latent.from_bytes(saved(fields))


@pytest.mark.parametrize(
    "name,value",
    [
        ("model", 5),
        ("model", None),
        ("weights", b"0123"),
        ("latent_space", ["native"]),
        ("height", "20"),
        ("height", 20.0),
        ("height", True),
        ("width", None),
        ("shape", (4, 3, 5)),
        ("shape", "4x3x5"),
        ("bits", 8.0),
        ("low", 0.5),
        ("step", (1.0, 1.0, 1.0, 1.0)),
        ("coding", None),
        ("payload", "text"),
        ("payload", [1, 2, 3]),
        ("payload", b"raw bytes"),
    ],
)
def test_field_of_wrong_type_refused(name, value):
    fields = good_fields()
    fields[name] = value
    with pytest.raises(CodecError, match=f"'{name}' has the wrong type"):
        Latent.from_bytes(saved(fields))


def change(**values):
    return values


BAD_VALUES = [
    pytest.param(change(format="hybrid-codec-weights"), "not a hybrid-codec latent file", id="format-other"),
    pytest.param(change(format=None), "not a hybrid-codec latent file", id="format-none"),
    pytest.param(change(version=3), "version 3 is not supported", id="version-3"),
    pytest.param(change(version=0), "version 0 is not supported", id="version-0"),
    pytest.param(change(version="1"), "version '1' is not supported", id="version-str"),
    pytest.param(change(version=True), "version True is not supported", id="version-bool"),
    pytest.param(change(version=1.0), "version 1.0 is not supported", id="version-float"),
    pytest.param(change(latent_space="pixels"), "unknown latent space", id="latent-space"),
    pytest.param(change(coding="zstd"), "unsupported latent coding", id="coding"),
    pytest.param(change(bits=16), "unsupported latent coding .* 16 bits", id="bits"),
    pytest.param(change(shape=[4, 3]), "not three positive integers", id="shape-2d"),
    pytest.param(change(shape=[4, 3, 5, 1]), "not three positive integers", id="shape-4d"),
    pytest.param(change(shape=[4, 0, 5]), "not three positive integers", id="shape-zero"),
    pytest.param(change(shape=[4, -3, 5]), "not three positive integers", id="shape-negative"),
    pytest.param(change(shape=[4, 3.0, 5]), "not three positive integers", id="shape-float"),
    pytest.param(change(shape=[4, True, 5]), "not three positive integers", id="shape-bool"),
    pytest.param(change(shape=[4, 10**5, 10**5]), "too large", id="shape-huge"),
    pytest.param(change(height=25), "image size 25x37 does not match latent shape", id="height-too-big"),
    pytest.param(change(height=16), "image size 16x37 does not match", id="height-too-small"),
    pytest.param(change(height=0), "does not match", id="height-zero"),
    pytest.param(change(width=-37), "does not match", id="width-negative"),
    pytest.param(change(width=41), "does not match", id="width-too-big"),
    pytest.param(change(width=32), "does not match", id="width-too-small"),
    pytest.param(change(step=[0.1, 0.0, 0.1, 0.1]), "'step' must be positive", id="step-zero"),
    pytest.param(change(step=[0.1, -0.1, 0.1, 0.1]), "'step' must be positive", id="step-negative"),
    pytest.param(change(step=[0.1, float("nan"), 0.1, 0.1]), "'step' must hold 4 finite", id="step-nan"),
    pytest.param(change(low=[float("nan"), 0.0, 0.0, 0.0]), "'low' must hold 4 finite", id="low-nan"),
    pytest.param(change(low=[float("inf"), 0.0, 0.0, 0.0]), "'low' must hold 4 finite", id="low-inf"),
    pytest.param(change(low=[0.0, 0, 0.0, 0.0]), "'low' must hold 4 finite", id="low-int-item"),
    pytest.param(change(low=["0", 0.0, 0.0, 0.0]), "'low' must hold 4 finite", id="low-str-item"),
    pytest.param(change(low=[0.0, 0.0, 0.0]), "'low' must hold 4", id="low-too-few-channels"),
    pytest.param(change(step=[0.1] * 5), "'step' must hold 4", id="step-too-many-channels"),
    pytest.param(change(low=[]), "'low' must hold 4", id="low-empty"),
    pytest.param(change(payload=as_payload(b"\x00")), "latent payload", id="payload-one-byte"),
    pytest.param(change(payload=as_payload(b"\x00garbage" * 8)), "corrupt latent payload", id="payload-garbage"),
]


@pytest.mark.parametrize(
    "payload",
    [torch.zeros(8, dtype=torch.int16), torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.float32)],
)
def test_payload_must_be_a_flat_uint8_tensor(payload):
    with pytest.raises(CodecError, match="'payload' must be a 1-D uint8 tensor"):
        Latent.from_bytes(saved({**good_fields(), "payload": payload}))


@pytest.mark.parametrize("values,message", BAD_VALUES)
def test_bad_field_value_refused(values, message):
    fields = {**good_fields(), **values}
    with pytest.raises(CodecError, match=message):
        Latent.from_bytes(saved(fields))


@pytest.mark.parametrize("shape", [(4, 3, 4), (4, 3, 6), (3, 3, 5), (4, 30, 50)])
def test_payload_of_wrong_length_refused(shape):
    fields = good_fields()
    fields["payload"] = make_latent(*shape, height=8 * shape[1], width=8 * shape[2]).to_dict()["payload"]
    expected = math.prod(shape) if math.prod(shape) < 60 else 61  # decompression stops one past the size
    with pytest.raises(CodecError, match=f"corrupt latent payload: {expected} values where 60 were expected"):
        Latent.from_bytes(saved(fields))


def test_truncated_payload_refused():
    fields = make_latent(h=10, w=12, height=80, width=96).to_dict()
    payload = fields["payload"]
    for cut in (1, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodecError, match="truncated latent payload|corrupt latent payload"):
            Latent.from_bytes(saved({**fields, "payload": payload[:cut]}))


def test_payload_bomb_is_not_inflated():
    fields = good_fields()  # 60 values expected
    bomb = zlib.compress(bytes(10**7), 9)  # 10 MB of zeros in about 10 KB
    fields["payload"] = as_payload(bomb)
    with pytest.raises(CodecError, match="corrupt latent payload: 61 values where 60"):
        Latent.from_bytes(saved(fields))


def test_largest_allowed_shape_is_checked_before_decompressing():
    side = math.isqrt(MAX_LATENT_VALUES // 4) + 1
    fields = {**good_fields(), "shape": [4, side, side], "height": 8 * side, "width": 8 * side}
    with pytest.raises(CodecError, match="too large"):
        Latent.from_bytes(saved(fields))


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.latent.pt"
    path.write_bytes(saved({**good_fields(), "bits": 4}))
    with pytest.raises(CodecError, match=r"bad\.latent\.pt: unsupported latent coding"):
        Latent.load(path)


# ---- truncated, damaged and foreign files --------------------------------------------------------


def test_every_truncation_refused():
    data = make_latent().to_bytes()
    for length in range(len(data)):
        with pytest.raises(CodecError, match="not a hybrid-codec latent file|latent payload"):
            Latent.from_bytes(data[:length])


def test_random_damage_refused_or_harmless():
    """Damaged bytes either still parse to a valid latent (a flipped code) or are refused: never a crash."""
    data = make_latent().to_bytes()
    rng = random.Random(0)
    refused = 0
    for _ in range(400):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            latent = Latent.from_bytes(bytes(damaged))
        except CodecError:
            refused += 1
        else:
            assert latent.codes.shape == (4, 3, 5)
    assert refused > 100


def test_empty_file_refused(tmp_path):
    path = tmp_path / "empty.latent.pt"
    path.write_bytes(b"")
    with pytest.raises(CodecError, match="empty.latent.pt: not a hybrid-codec latent file"):
        Latent.load(path)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def torch_saved(obj, zip_format: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(np.random.default_rng(0).bytes(700), id="random-bytes"),
        pytest.param(png_bytes(), id="png"),
        pytest.param(b"hybrid-codec-latent\n", id="text"),
        pytest.param(torch_saved(torch.zeros(4, 3, 5), zip_format=True), id="tensor-zip"),
        pytest.param(torch_saved(torch.zeros(4, 3, 5), zip_format=False), id="tensor-legacy"),
        pytest.param(torch_saved({"weights": torch.ones(3)}, zip_format=True), id="state-dict"),
        pytest.param(torch_saved([1, 2, 3], zip_format=False), id="list"),
        pytest.param(torch_saved({"format": "something-else"}, zip_format=False), id="other-format"),
        pytest.param(pickle.dumps({"format": FORMAT, "version": VERSION}), id="bare-pickle"),
    ],
)
def test_foreign_file_refused(data, tmp_path):
    path = tmp_path / "foreign.latent.pt"
    path.write_bytes(data)
    with pytest.raises(CodecError, match="not a hybrid-codec latent file"):
        Latent.load(path)


def touch_marker(path: str) -> None:
    Path(path).write_text("code ran")


class Booby:
    """Unpickling this calls `touch_marker`: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return touch_marker, (str(self.marker),)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_class_refused_without_running_code(tmp_path, zip_format):
    marker = tmp_path / "marker"
    data = torch_saved({"format": FORMAT, "version": VERSION, "model": Booby(marker)}, zip_format)
    with pytest.raises(pickle.UnpicklingError):  # what the reader relies on
        torch.load(io.BytesIO(data), weights_only=True)
    path = tmp_path / "evil.latent.pt"
    path.write_bytes(data)
    with pytest.raises(CodecError, match="not a hybrid-codec latent file"):
        Latent.load(path)
    assert not marker.exists()
    torch.load(io.BytesIO(data), weights_only=False)  # the payload is live: a plain load does run it
    assert marker.read_text() == "code ran"


def test_missing_file_and_folder_refused(tmp_path):
    with pytest.raises(CodecError, match="no such file"):
        Latent.load(tmp_path / "nothing.latent.pt")
    with pytest.raises(CodecError, match="is a folder"):
        Latent.load(tmp_path)


# ---- latents meet the codec ----------------------------------------------------------------------


def tiny_codec(seed: int) -> Codec:
    torch.manual_seed(seed)
    return Codec(Autoencoder(TINY))


def test_latent_from_other_weights_refused_naming_both_hashes(tmp_path):
    first, second = tiny_codec(0), tiny_codec(1)
    assert first.weights_hash != second.weights_hash
    path = first.encode(torch.rand(3, 9, 10)).save(tmp_path / "a.latent.pt")
    with pytest.raises(CodecError) as info:
        second.decode(path)
    message = str(info.value)
    assert first.weights_hash in message and second.weights_hash in message
    assert first.decode(path).size == (10, 9)


def test_latent_with_wrong_channel_count_refused():
    codec = tiny_codec(0)
    latent = Latent(torch.zeros(3, 2, 2, dtype=torch.uint8), torch.zeros(3), torch.ones(3), 16, 16, "tiny", "")
    latent.weights = codec.weights_hash
    with pytest.raises(CodecError, match="3 channels; this model uses 4"):
        codec.decode(latent)


def test_latent_records_the_model_that_made_it():
    codec = tiny_codec(0)
    latent = Latent.from_bytes(codec.encode(torch.rand(3, 17, 8)).to_bytes())
    assert (latent.model, latent.weights, latent.latent_space) == ("tiny", codec.weights_hash, "native")
    assert (latent.height, latent.width, tuple(latent.codes.shape)) == (17, 8, (4, 3, 1))
