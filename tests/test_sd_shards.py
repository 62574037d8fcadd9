"""sd-latents under torchrun (gloo, 2 CPU processes): a shard per rank, a kill and a resume that
redoes no image, and rank 0's manifest once every shard is complete."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import smooth_image
from PIL import Image
from test_sd import TINY_SD

from hybrid_codec.errors import CodecError
from hybrid_codec.models import Autoencoder
from hybrid_codec.sd import encode_latents
from hybrid_codec.sd_dataset import write_sd_latents

CRASHING_RANK = """
import os, signal, sys
import hybrid_codec.sd_dataset as sd_dataset

if os.environ["RANK"] == "1":  # rank 1 dies, as a killed node would, after its second latent
    put, written = sd_dataset._NpyFolder.put, []
    def put_then_die(self, key, latent):
        put(self, key, latent)
        written.append(key)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    sd_dataset._NpyFolder.put = put_then_die
sys.argv[1:1] = ["sd-latents"]
from hybrid_codec.cli import main
main()
"""


def torchrun(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def shard_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sorted(f.keys())


def done_by(out, rank: int) -> int:
    """Latents a rank has finished: its complete shard's, else those in its parts folder."""
    shard = out / f"shard-{rank:05d}-of-00002.safetensors"
    if shard.exists():
        return len(shard_keys(shard))
    return len(list((out / f".{shard.name}.parts").glob("*.npy")))


def test_two_ranks_killed_and_resumed(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):  # three sizes, mixed in name order
        Image.fromarray(smooth_image(48 + 16 * (i % 3), 64, seed=i)).save(images / f"img{i}.png")
    torch.manual_seed(1)
    weights = Autoencoder(TINY_SD).save_pretrained(tmp_path / "tinysd.safetensors")
    out = tmp_path / "latents"
    args = [images, "--out", out, "-m", weights, "--device", "cpu", "--batch-size", "1"]
    crash = tmp_path / "crash.py"
    crash.write_text(CRASHING_RANK)

    killed = torchrun(crash, *args)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert not (out / "manifest.json").exists()  # no manifest before every shard is complete
    assert done_by(out, 1) == 2
    before = [done_by(out, 0), done_by(out, 1)]

    resumed = torchrun("-m", "hybrid_codec.sd_latents", *args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for rank in (0, 1):
        line = re.search(
            rf"wrote (\d+) latents to \S*shard-0000{rank}-of-00002\.safetensors(, (\d+) already there)?", resumed.stdout
        )
        assert line, resumed.stdout
        assert int(line[1]) == 5 - before[rank] and int(line[3] or 0) == before[rank]  # nothing done twice

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world"] == 2 and manifest["model"] == "tinysd"
    assert sorted(manifest["images"]) == [f"img{i}.png" for i in range(10)]
    for rank in (0, 1):
        shard = f"shard-{rank:05d}-of-00002.safetensors"
        held = sorted(key for key, where in manifest["images"].items() if where["shard"] == shard)
        assert shard_keys(out / shard) == held and len(held) == 5
        sizes = {Image.open(images / key).size for key in held}
        assert len(sizes) == 3  # each rank took its share of every size
    assert not list(out.glob(".*.parts"))

    from safetensors.torch import load_file

    where = manifest["images"]["img4.png"]
    latent = load_file(out / where["shard"])[where["key"]]
    expected = encode_latents(images / "img4.png", model=weights, device="cpu")[0]
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)

    (out / "notes.txt").write_text("mine")
    restarted = torchrun("-m", "hybrid_codec", "sd-latents", *args, "--restart")  # the CLI, the same command
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert len(re.findall(r"wrote 5 latents to \S*shard-0000[01]-of-00002\.safetensors\n", restarted.stdout)) == 2
    assert (out / "notes.txt").read_text() == "mine"  # --restart drops what runs wrote, nothing else


def test_torchrun_needs_a_folder(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CodecError, match="under torchrun --out is a folder"):
        write_sd_latents(image_folder, tmp_path / "latents.safetensors", device="cpu")
