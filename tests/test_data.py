"""Training data: image discovery, skipping bad files, reproducible crops, the step sampler."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import smooth_image
from PIL import Image

from hybrid_codec.data import MIN_SIDE, RandomCrops, StepSampler, usable_images
from hybrid_codec.errors import CodecError

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_finds_every_format_recursively_and_nothing_else(tmp_path):
    expected = []
    for i, (ext, fmt) in enumerate(FORMATS.items()):
        folder = tmp_path / ("a" if i % 2 else "b") / ("deep" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i}.{ext.upper() if i == 3 else ext}"  # extensions in any case
        path.write_bytes(encoded(smooth_image(24, 32, seed=i), fmt))
        expected.append(path)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "folder.png").mkdir()  # a folder named like an image is not one
    warnings: list[str] = []
    assert usable_images(tmp_path, warn=warnings.append) == sorted(expected)
    assert warnings == []


def test_unreadable_and_tiny_images_are_skipped_with_one_warning_each(tmp_path):
    good = smooth_image(40, 48)
    (tmp_path / "good.png").write_bytes(encoded(good, "PNG"))
    bad = {
        "random.png": np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "empty.jpg": b"",
        "text.webp": b"hello, not a webp",
        "truncated.png": encoded(good, "PNG")[:300],
        # formats whose header survives truncation: only a full decode finds these
        "truncated.jpg": encoded(good, "JPEG")[:-200],
        "truncated.bmp": encoded(good, "BMP")[:-500],
        "truncated.tiff": encoded(good, "TIFF")[:-500],
        "tiny.png": encoded(smooth_image(MIN_SIDE - 1, 64), "PNG"),
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    warnings: list[str] = []
    assert usable_images(tmp_path, warn=warnings.append) == [tmp_path / "good.png"]
    assert len(warnings) == len(bad)
    for name in bad:
        assert sum(name in w for w in warnings) == 1, (name, warnings)
    assert any("smaller than" in w for w in warnings if "tiny.png" in w)
    # every usable image really loads: training never meets a file it cannot decode
    crops = RandomCrops(usable_images(tmp_path, warn=lambda m: None), crop=32, seed=0)
    assert crops[0].shape == (3, 32, 32)


def test_folder_without_usable_images_is_a_clear_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(CodecError, match="no usable images"):
        usable_images(tmp_path, warn=lambda m: None)
    with pytest.raises(CodecError, match="no such folder"):
        usable_images(tmp_path / "missing", warn=lambda m: None)


def test_images_smaller_than_the_crop_are_padded(tmp_path):
    image = smooth_image(20, 26, seed=3)
    (tmp_path / "small.png").write_bytes(encoded(image, "PNG"))
    crops = RandomCrops([tmp_path / "small.png"], crop=32, seed=0, min_scale=0.5)
    # what a crop may be: a 20x20 window of the image, edge-padded to 32x32, perhaps flipped
    candidates = []
    for left in range(26 - 20 + 1):
        padded = np.pad(image[:, left : left + 20], ((0, 12), (0, 12), (0, 0)), mode="edge")
        candidates += [padded, padded[:, ::-1]]
    for i in range(8):
        crop = crops[i]
        assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32
        pixels = (crop.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert any(np.array_equal(pixels, c) for c in candidates)


def test_same_seed_and_index_give_the_same_crop(image_folder):
    paths = usable_images(image_folder, warn=lambda m: None)
    a = RandomCrops(paths, crop=32, seed=7, min_scale=0.5)
    b = RandomCrops(paths, crop=32, seed=7, min_scale=0.5)  # a fresh object, as in another worker
    forward = [a[i] for i in range(12)]
    backward = [b[i] for i in reversed(range(12))][::-1]  # order of access does not matter
    for x, y in zip(forward, backward, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(forward[0], forward[1])
    other_seed = RandomCrops(paths, crop=32, seed=8, min_scale=0.5)
    assert not all(torch.equal(forward[i], other_seed[i]) for i in range(4))
    # each epoch of len(paths) samples shows every image once
    assert len(paths) == 4


def test_loader_batches_do_not_depend_on_the_number_of_workers(image_folder):
    paths = usable_images(image_folder, warn=lambda m: None)
    crops = RandomCrops(paths, crop=32, seed=1)

    def batches(workers: int) -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(crops, batch_size=3, sampler=StepSampler(2, 6, 3), num_workers=workers)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 4
    for x, y in zip(serial, parallel, strict=True):
        assert torch.equal(x, y)


def test_step_sampler_gives_each_rank_a_disjoint_share():
    batch, world, steps = 4, 3, 5
    shares = [list(StepSampler(0, steps, batch, rank, world)) for rank in range(world)]
    for share in shares:
        assert len(share) == steps * batch == len(StepSampler(0, steps, batch, 0, world))
    everything = [i for share in shares for i in share]
    assert len(set(everything)) == len(everything)  # disjoint
    assert sorted(everything) == list(range(steps * batch * world))  # and together they cover every sample
    for step in range(steps):  # each step's global batch is split between the ranks
        global_batch = set(range(step * batch * world, (step + 1) * batch * world))
        assert {i for share in shares for i in share[step * batch : (step + 1) * batch]} == global_batch


@pytest.mark.parametrize("world", [1, 2])
def test_resumed_sampler_continues_exactly(world):
    batch, steps = 3, 10
    for rank in range(world):
        full = list(StepSampler(0, steps, batch, rank, world))
        for start in (1, 4, 9, 10):
            resumed = StepSampler(start, steps, batch, rank, world)
            assert list(resumed) == full[start * batch :]
            assert len(resumed) == (steps - start) * batch
