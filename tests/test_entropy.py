"""Quality levels: the entropy coder's exact round trips, the compact file's checks, and the shipped levels."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import smooth_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hybrid_codec import entropy, load_codec
from hybrid_codec.bitstream import Latent, read
from hybrid_codec.compact import HEADER_BYTES, Packed, unpack
from hybrid_codec.errors import CodecError
from hybrid_codec.levels import QualityLevels, export_levels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photo():
    return load_codec("photo", device="cpu")


def test_phases_visit_every_position_but_the_first_once_and_only_after_their_neighbours():
    for height, width in [(1, 1), (1, 7), (6, 1), (5, 9), (16, 16), (17, 3)]:
        known = np.zeros(height * width, bool)
        known[0] = True
        for phase in entropy.phases(height, width):
            assert known[phase.neighbours].all()  # predictions read only decoded codes
            assert not known[phase.targets].any()
            known[phase.targets] = True
        assert known.all()


codes_arrays = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape_seed=codes_arrays, level=st.integers(1, 7), kind=st.sampled_from(["smooth", "wild", "flat"]))
def test_every_level_decodes_exactly_what_was_coded(shape_seed, level, kind, photo_levels):
    height, width, seed = shape_seed
    rng = np.random.default_rng(seed)
    if kind == "smooth":
        codes = np.cumsum(rng.integers(-3, 4, (4, height, width)), axis=2)
    elif kind == "wild":  # escapes everywhere, up to the clipping range
        codes = rng.integers(-entropy.CODE_LIMIT, entropy.CODE_LIMIT + 1, (4, height, width))
    else:
        codes = np.full((4, height, width), rng.integers(-50, 50))
    coder = photo_levels.coder(min(level, photo_levels.count))
    data = coder.compress(codes)
    assert np.array_equal(coder.decompress(data, codes.shape), codes)


@pytest.mark.skipif(entropy._fast is None, reason="built without the C kernel")
@settings(max_examples=60, deadline=None)
@given(shape_seed=codes_arrays, channels=st.integers(1, 5), kind=st.sampled_from(["smooth", "wild", "flat"]))
def test_the_compiled_context_model_gives_numpys_symbols_exactly(shape_seed, channels, kind):
    """Symbols, escapes and counts per key, bit for bit, with the kernel and without (HYBRID_CODEC_KERNEL=0),
    and so the same bytes: the decoder (numpy) expects what either encoder wrote."""
    height, width, seed = shape_seed
    rng = np.random.default_rng(seed)
    if kind == "smooth":
        codes = np.cumsum(rng.integers(-9, 10, (channels, height, width)), axis=2)
    elif kind == "wild":  # negative sums, every context, escapes at both ends of the range
        codes = rng.integers(-entropy.CODE_LIMIT, entropy.CODE_LIMIT + 1, (channels, height, width))
    else:
        codes = np.full((channels, height, width), rng.integers(-50, 50))
    flat = np.ascontiguousarray(codes, dtype=np.int16).ravel()
    plan = entropy.coding_plan(channels, height, width)
    compiled = entropy.sorted_symbols(flat, plan, channels)
    tables = entropy.fit_tables(rng.integers(0, 50, (channels, entropy.CONTEXTS, entropy.SYMBOLS)))
    coder = entropy.EntropyCoder(tables)
    data = coder.compress(codes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYBRID_CODEC_KERNEL", "0")
        plain = entropy.sorted_symbols(flat, plan, channels)
        assert coder.compress(codes) == data
    for got, expected in zip(compiled, plain, strict=True):
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert compiled[2].sum() == plan.joined.targets.size
    assert np.array_equal(coder.decompress(data, codes.shape), codes)


@pytest.fixture(scope="module")
def photo_levels(photo):
    return photo.levels


def test_tables_are_integers_summing_to_the_total_with_no_zero(photo_levels):
    tables = photo_levels.tables
    assert tables.dtype in (torch.int32, torch.int64)
    assert (tables >= 1).all() and (tables.sum(-1) == entropy.TOTAL).all()


def test_fit_tables_keeps_every_symbol_codable_and_follows_the_counts():
    counts = np.zeros((2, entropy.CONTEXTS, entropy.SYMBOLS))
    counts[..., entropy.RADIUS] = 1000  # residual 0
    tables = entropy.fit_tables(counts)
    assert (tables >= 1).all() and (tables.sum(-1) == entropy.TOTAL).all()
    assert (tables.argmax(-1) == entropy.RADIUS).all()


def test_codes_out_of_range_are_refused(photo_levels):
    with pytest.raises(ValueError, match="within"):
        photo_levels.coder(1).compress(np.full((4, 2, 2), entropy.CODE_LIMIT + 1))


def test_real_latents_round_trip_at_every_level_and_lower_levels_are_smaller(photo):
    image = smooth_image(77, 130, seed=3)
    sizes = []
    for level in range(1, photo.quality_levels + 1):
        latent = photo.encode(image, quality=level)
        data = photo.to_bytes(latent)
        again = photo.load(data)
        assert torch.equal(again.codes, latent.codes) and again.level == level
        assert photo.decode(data).size == (130, 77)
        sizes.append(len(data))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_quality_is_checked(photo, tiny_weights):
    for bad in (0, photo.quality_levels + 1, 2.0, "3"):
        with pytest.raises(CodecError, match="quality must be an integer"):
            photo.encode(smooth_image(16, 16), quality=bad)
    with pytest.raises(CodecError, match="no quality levels"):
        load_codec(tiny_weights, device="cpu").encode(smooth_image(16, 16), quality=2)


def test_same_bytes_with_one_and_two_threads_kernel_or_not():
    script = textwrap.dedent(
        """
        import hashlib, sys, torch
        from hybrid_codec import load_codec
        sys.path.insert(0, "tests")
        from conftest import smooth_image
        torch.set_num_threads(int(sys.argv[1]))
        codec = load_codec("photo", device="cpu")
        image = smooth_image(96, 120, seed=1)
        print(" ".join(hashlib.sha256(codec.compress(image, q)).hexdigest() for q in range(1, 8)))
        """
    )

    def run(threads: int, kernel: str) -> str:
        env = {**os.environ, "HYBRID_CODEC_KERNEL": kernel}
        done = subprocess.run(
            [sys.executable, "-c", script, str(threads)], capture_output=True, text=True, env=env, check=True, cwd=ROOT
        )
        return done.stdout

    first = run(1, "1")
    assert run(2, "1") == first
    assert run(1, "0") == run(2, "0")


def test_a_pt_copy_holds_the_same_codes_and_decodes_alike(photo, tmp_path):
    image = smooth_image(40, 56, seed=2)
    latent = photo.encode(image, quality=3)
    latent.save(tmp_path / "x.latent.pt")
    fields = torch.load(tmp_path / "x.latent.pt", weights_only=True)
    assert fields["version"] == 2 and fields["level"] == 3 and fields["codes"].dtype == torch.int16
    again = Latent.load(tmp_path / "x.latent.pt")
    assert torch.equal(again.codes, latent.codes)
    assert np.array_equal(np.asarray(photo.decode(again)), np.asarray(photo.decode(photo.to_bytes(latent))))


def test_the_header_is_small_and_every_field_is_checked(photo):
    data = photo.compress(smooth_image(33, 47, seed=4), quality=2)
    assert HEADER_BYTES <= 40
    packed = unpack(data)
    assert (packed.level, packed.height, packed.width, packed.weights) == (2, 33, 47, photo.weights_hash)
    for offset in range(HEADER_BYTES):
        tampered = bytearray(data)
        tampered[offset] ^= 0x5A
        with pytest.raises(CodecError):
            photo.load(bytes(tampered))
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            photo.load(data[:cut])


def test_header_fields_refused_by_name_even_with_a_matching_checksum(photo):
    import struct
    import zlib

    from hybrid_codec.compact import HEADER

    data = photo.compress(smooth_image(24, 24), quality=1)
    payload = data[HEADER_BYTES:]

    def forged(**fields) -> bytes:
        values = dict(magic=b"HYBC", version=1, level=1, weights=bytes.fromhex(photo.weights_hash), height=24, width=24)
        values.update(fields)
        header = HEADER.pack(*values.values())
        return header + struct.pack("<I", zlib.crc32(payload, zlib.crc32(header))) + payload

    cases = {
        "version 9 is not supported": forged(version=9),
        "level 0 does not exist": forged(level=0),
        "quality level 99 does not exist": forged(level=99),
        "out of range": forged(height=0),
        "made by weights 0000000000000000": forged(weights=bytes(8)),
        "not a hybrid-codec": b"HYBX" + data[4:],
    }
    for message, data in cases.items():
        with pytest.raises(CodecError, match=message):
            photo.load(data)
    assert isinstance(read(forged()), Packed)


def test_a_packed_file_is_not_read_as_a_pt_and_vice_versa(photo, tmp_path):
    (tmp_path / "x.hyb").write_bytes(photo.compress(smooth_image(16, 16), quality=1))
    with pytest.raises(CodecError, match="compact file"):
        Latent.load(tmp_path / "x.hyb")


def test_export_levels_fits_tables_that_code_the_training_latents_compactly():
    torch.manual_seed(0)
    latents = [torch.cumsum(torch.randn(4, 12, 12) * 0.05, dim=-1) for _ in range(3)]
    levels = QualityLevels(2, 4)
    export_levels(levels, torch.tensor([[0.02] * 4, [0.1] * 4]), latents)
    uniform = QualityLevels(2, 4)
    uniform.steps.copy_(levels.steps)
    for level in (1, 2):
        codes = levels.codes(latents[0], level).numpy()
        fitted, flat = len(levels.coder(level).compress(codes)), len(uniform.coder(level).compress(codes))
        assert fitted < flat
        assert np.array_equal(levels.coder(level).decompress(levels.coder(level).compress(codes), codes.shape), codes)


def test_the_decoded_image_is_cropped_to_the_original_size(photo):
    image = Image.fromarray(smooth_image(9, 17))
    buffer = io.BytesIO(photo.compress(image))
    assert photo.decompress(buffer.getvalue()).size == (17, 9)


def test_a_forged_payload_with_a_valid_checksum_decodes_or_is_refused_never_crashes(photo):
    import struct
    import zlib

    from hybrid_codec.compact import HEADER

    data = photo.compress(smooth_image(40, 50), quality=5)
    header, payload = data[: HEADER.size], data[HEADER_BYTES:]
    rng = np.random.default_rng(0)
    for trial in range(300):
        if trial % 2:
            forged = bytearray(payload)
            for _ in range(rng.integers(1, 5)):
                forged[rng.integers(len(forged))] ^= int(rng.integers(1, 256))
        else:
            forged = rng.integers(0, 256, 4 * int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
        forged = bytes(forged)
        file = header + struct.pack("<I", zlib.crc32(forged, zlib.crc32(header))) + forged
        try:
            assert photo.decode(file).size == (50, 40)
        except CodecError:
            pass
