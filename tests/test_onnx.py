"""ONNX export: the graphs agree with the plain PyTorch layers at several sizes, runtime.json holds what a
runtime needs, an earlier export is never overwritten without --force, and the README's torch-free
decoding example runs as written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, smooth_image
from PIL import Image
from test_cli import fails, ok, snapshot

from hybrid_codec import onnx_export
from hybrid_codec.codec import load_codec
from hybrid_codec.models import Autoencoder

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped `photo` model exported by the command, over an earlier file with --force."""
    out = tmp_path_factory.mktemp("onnx") / "export"
    out.mkdir()
    (out / "encoder.onnx").write_bytes(b"an earlier export")
    fails("export", "photo", "--out", out, match=r"encoder\.onnx exists; use --force")
    assert snapshot(out) == {"encoder.onnx": b"an earlier export"}
    text = ok("export", "photo", "--out", out, "--force").stdout
    assert "opset 18" in text and "onnxruntime against PyTorch: encoder within" in text, text
    return out


@pytest.fixture(scope="module")
def codec():
    return load_codec("photo", device="cpu")


def session(path: Path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_runtime_json_describes_the_graphs_and_the_levels(exported, codec):
    runtime = json.loads((exported / "runtime.json").read_text())
    assert runtime["format"] == "hybrid-codec-onnx" and runtime["opset"] == onnx_export.OPSET == 18
    assert runtime["weights"] == codec.weights_hash and runtime["model"] == "photo"
    assert runtime["padding"]["mode"] == "edge" and runtime["padding"]["multiple"] == 8
    assert runtime["encoder"]["input"]["range"] == [0.0, 1.0] and runtime["encoder"]["input"]["layout"] == "NCHW"
    quantization = runtime["quantization"]
    np.testing.assert_array_equal(np.float32(quantization["offset"]), codec.levels.offset.numpy())
    assert len(quantization["levels"]) == codec.quality_levels == 9
    for i, level in enumerate(quantization["levels"]):
        assert level["level"] == i + 1
        np.testing.assert_array_equal(np.float32(level["steps"]), codec.levels.steps[i].numpy())
        np.testing.assert_array_equal(np.array(level["tables"]), codec.levels.tables[i].numpy())
    for name, part in (("encoder.onnx", "encoder"), ("decoder.onnx", "decoder")):
        model = onnx.load(exported / name)
        onnx.checker.check_model(model)
        assert {o.domain: o.version for o in model.opset_import}[""] == 18
        assert {p.key: p.value for p in model.metadata_props}["weights"] == codec.weights_hash
        import hashlib

        assert runtime["sha256"][name] == hashlib.sha256((exported / name).read_bytes()).hexdigest()
        for value, described in ((model.graph.input[0], "input"), (model.graph.output[0], "output")):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert value.name == runtime[part][described]["name"]
            assert dims == runtime[part][described]["shape"], (name, dims)  # batch, height and width dynamic


@pytest.mark.parametrize("batch, height, width", [(1, 8, 8), (2, 64, 96), (1, 37, 53), (3, 17, 121)])
def test_the_graphs_agree_with_pytorch(exported, codec, batch, height, width):
    """Within 1e-4 of the plain layers, and of the codec (which pads odd sizes itself, as runtime.json says)."""
    rng = np.random.default_rng(height)
    images = np.stack([smooth_image(height, width, seed) for seed in range(batch)]).transpose(0, 3, 1, 2) / 255
    images = images.astype(np.float32)
    padded = np.pad(images, ((0, 0), (0, 0), (0, -height % 8), (0, -width % 8)), mode="edge")
    (latent,) = session(exported / "encoder.onnx").run(None, {"image": padded})
    with torch.no_grad():
        plain = codec.model.encoder(torch.from_numpy(padded)).numpy()
    assert latent.shape == (batch, 4, -(-height // 8), -(-width // 8))
    assert np.abs(latent - plain).max() < 1e-4
    assert np.abs(latent - codec.encode_tensor(torch.from_numpy(images)).numpy()).max() < 1e-4

    latents = (latent + rng.normal(0, 0.05, latent.shape)).astype(np.float32)  # what quantization leaves
    (decoded,) = session(exported / "decoder.onnx").run(None, {"latent": latents})
    with torch.no_grad():
        plain = codec.model.decoder(torch.from_numpy(latents)).numpy()
    assert decoded.shape == padded.shape and decoded.min() >= 0 and decoded.max() <= 1
    assert np.abs(decoded - plain).max() < 1e-4
    assert np.abs(decoded - codec.decode_tensor(torch.from_numpy(latents)).numpy()).max() < 1e-4


def test_the_activation_operators_are_translated_exactly():
    """ONNX has no copysign; the translations take the sign of -0.0, tiny numbers and infinities, and
    nan_to_num's infinities go to the largest float32, as in torch."""

    class Activation(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.ones_like(x).copysign(x), x.nan_to_num(nan=0.0)])

    data = onnx_export.to_onnx(Activation(), torch.randn(4), "x", "y", {0: torch.export.Dim("n")}, {})
    x = np.array([-0.0, 0.0, -1e-30, 1e-30, -2.5, 3.0, -np.inf, np.inf, np.nan], np.float32)
    (y,) = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y[0, :-1], np.copysign(np.ones_like(x), x)[:-1])  # NaN's sign: either
    np.testing.assert_array_equal(y[1], torch.from_numpy(x).nan_to_num(nan=0.0).numpy())


def test_the_readme_decodes_a_file_with_onnxruntime_and_numpy_only(exported, codec, tmp_path):
    text = README.read_text()
    snippet = text[text.index("## ONNX export") :].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "export").symlink_to(exported)
    (tmp_path / "photo.hyb").write_bytes(codec.compress(smooth_image(45, 70), quality=4))
    check = "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    result = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ours = np.asarray(Image.open(tmp_path / "photo.onnx.png"), dtype=np.int16)
    theirs = np.asarray(codec.decode(tmp_path / "photo.hyb"), dtype=np.int16)
    assert ours.shape == theirs.shape == (45, 70, 3)
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01  # float rounding at a pixel's edge


def test_a_model_without_levels_says_so(tmp_path):
    runtime = onnx_export.describe(Autoencoder(TINY), {})
    assert runtime["quantization"]["levels"] == [] and "8-bit" in runtime["quantization"]["rule"]
    assert runtime["config"]["encoder_hidden"] == 4 and "entropy" not in runtime


def test_bad_exports_are_one_line(tmp_path, monkeypatch):
    fails("export", "nonesuch", "--out", tmp_path / "x", match="neither a shipped model")
    (tmp_path / "file").write_text("")
    fails("export", "photo", "--out", tmp_path / "file", match="exists and is not a folder")
    real = onnx_export.importlib.util.find_spec
    monkeypatch.setattr(onnx_export.importlib.util, "find_spec", lambda n: None if n == "onnxscript" else real(n))
    fails("export", "photo", "--out", tmp_path / "y", match=r"needs onnxscript: pip install 'hybrid-codec\[onnx\]'")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
