"""asyncckpt.codec.planes: floats as rotated byte planes, each a zstd frame or stored as is."""

from __future__ import annotations

import os
import shutil
import zlib

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncckpt.codec import CodecConfig, decode, encode, libzstd, planes, registry
from asyncckpt.errors import CheckpointDamagedError

WORD = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def reference_planes(raw: bytes, size: int, rotate: int) -> list[bytes]:
    """docs/format.md's definition, the slow way: rotate each little-endian element left, then
    plane p holds byte p of every element."""
    bits = 8 * size
    mask = (1 << bits) - 1
    out = [bytearray() for _ in range(size)]
    for k in range(0, len(raw), size):
        value = int.from_bytes(raw[k : k + size], "little")
        value = ((value << rotate) | (value >> (bits - rotate))) & mask
        for p, byte in enumerate(value.to_bytes(size, "little")):
            out[p].append(byte)
    return [bytes(b) for b in out]


def trained_like(dtype: torch.dtype, n: int = 1 << 15, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen, dtype=torch.float64) * 0.02).to(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def chunk_of(dtype: torch.dtype, n: int = 1 << 15):
    raw = as_bytes(trained_like(dtype, n))
    chunk = encode(raw, dtype.itemsize, CodecConfig("zstd", 1))
    return raw, bytes(chunk.data), chunk.codecs, chunk.crc32


def decode_new(stored: bytes, codecs: list[dict], crc: int, raw_length: int) -> torch.Tensor:
    out = torch.full((raw_length,), 0xA5, dtype=torch.uint8)
    decode(stored, codecs, crc, out, "chunk 4")
    return out


@pytest.fixture(params=["compiled", "numpy"])
def kernel(request, monkeypatch):
    """Both implementations of the transform: the C kernel built at install, and numpy's."""
    if request.param == "numpy":
        monkeypatch.setattr(planes, "_kernel", lambda: None)
    elif planes._kernel() is None:
        if shutil.which(os.environ.get("CC", "cc")) is None:
            pytest.skip("no C compiler here, so no compiled kernel: numpy's is the one in use")
        raise AssertionError("a C compiler is present but the kernel was not built (setup.py's extension)")
    return request.param


@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=2048), rotate=st.integers(0, 63))
def test_planes_match_the_format_definition_for_any_bytes_and_rotation(kernel, size, offset, data, rotate):
    rotate %= 8 * size
    whole = len(data) - len(data) % size
    buffer = np.zeros(offset + whole, dtype=np.uint8)
    raw = buffer[offset:]
    raw[:] = np.frombuffer(data[:whole], dtype=np.uint8)
    got = planes.split_planes(raw, size, rotate)
    assert [bytes(p) for p in got] == reference_planes(data[:whole], size, rotate)
    out = np.full(offset + whole, 0xA5, dtype=np.uint8)
    planes.join_planes(got.copy(), rotate, out[offset:])
    assert bytes(out[offset:]) == data[:whole]


def test_every_16_bit_pattern_round_trips_and_bf16_exponents_fill_their_own_plane(kernel):
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    raw = values.view(np.uint8)
    got = planes.split_planes(raw, 2, 1)
    # rotated left by one, a bf16's top byte is its 8 exponent bits and nothing else
    assert np.array_equal(got[1], ((values >> 7) & 0xFF).astype(np.uint8))
    assert np.array_equal(got[0], (((values & 0x7F) << 1) | (values >> 15)).astype(np.uint8))
    out = np.empty_like(raw)
    planes.join_planes(got.copy(), 1, out)
    assert np.array_equal(out, raw)


def test_fp32_exponents_fill_the_top_plane(kernel):
    values = trained_like(torch.float32)
    got = planes.split_planes(as_bytes(values).numpy(), 4, 1)
    exponents = (values.view(torch.int32) >> 23) & 0xFF
    assert np.array_equal(got[3], exponents.to(torch.uint8).numpy())


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64], ids=str
)
def test_each_part_is_a_plain_zstd_frame_or_the_plane_itself(kernel, decoder, dtype):
    raw, stored, codecs, crc = chunk_of(dtype) if not dtype.is_complex else (None, None, None, None)
    if dtype.is_complex:
        raw = as_bytes(torch.randn(1 << 14, dtype=dtype, generator=torch.Generator().manual_seed(2)) * 0.02)
        chunk = encode(raw, 8, CodecConfig("zstd", 1))
        stored, codecs, crc = bytes(chunk.data), chunk.codecs, chunk.crc32
    (spec,) = codecs
    size = spec["size"]
    expected = reference_planes(bytes(raw.numpy()), size, 1)
    at = 0
    kinds = set()
    for plane, n in zip(expected, spec["parts"], strict=True):
        part = stored[at : at + n]
        at += n
        if n == len(plane):
            assert part == plane
            kinds.add("raw")
        else:
            assert zstandard.ZstdDecompressor().decompress(part) == plane  # any zstd decoder reads it
            kinds.add("zstd")
    assert at == len(stored) and zlib.crc32(stored) == crc
    assert "zstd" in kinds  # the exponent plane at least compresses
    assert torch.equal(decode_new(stored, codecs, crc, raw.numel()), raw)


def test_mantissa_planes_of_trained_weights_are_stored_as_they_are():
    _, stored, codecs, _ = chunk_of(torch.float32)
    plane = (1 << 15) * 4 // 4
    parts = codecs[0]["parts"]
    assert parts[0] == plane and parts[1] == plane  # the random low mantissa bytes
    assert parts[3] < plane // 2  # the exponents: well under half


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(1 << 18),
        lambda: torch.ones(1 << 18).bfloat16(),
        lambda: torch.randn(1024, generator=torch.Generator().manual_seed(5)).repeat(256),
    ],
    ids=["zeros", "ones-bf16", "repeated-rows"],
)
def test_runs_and_repeated_rows_still_compress_a_hundredfold(make):
    tensor = make()
    raw = as_bytes(tensor)
    chunk = encode(raw, tensor.element_size(), CodecConfig("zstd", 1))
    assert chunk.codecs[0]["id"] == "planes"
    assert len(chunk.data) * 100 < raw.numel()
    assert torch.equal(decode_new(bytes(chunk.data), chunk.codecs, chunk.crc32, raw.numel()), raw)


@pytest.mark.parametrize("row", [1000, 3000, 5000])
def test_repeated_rows_of_a_full_chunk_compress_in_every_plane(row):
    """A 4 MiB chunk: its planes are long enough that a sample judges the low ones first, and
    the sample's runs fall at other places in the rows; the repeats between them still count."""
    n = 1 << 20
    tensor = torch.randn(row, generator=torch.Generator().manual_seed(5)).repeat(n // row + 1)[:n]
    raw = as_bytes(tensor)
    chunk = encode(raw, 4, CodecConfig("zstd", 1))
    (spec,) = chunk.codecs
    assert all(part * 100 < n for part in spec["parts"]), spec["parts"]
    assert torch.equal(decode_new(bytes(chunk.data), chunk.codecs, chunk.crc32, raw.numel()), raw)


def test_a_low_plane_that_shrinks_is_coded_and_a_random_one_stored_as_it_is():
    n = 1 << 20
    rng = np.random.default_rng(11)
    wanted = np.stack(
        [
            rng.integers(0, 256, n, dtype=np.uint8),
            (rng.random(n) < 0.97).astype(np.uint8) * 17,  # shrinks well, in every sampled run
            rng.integers(0, 256, n, dtype=np.uint8),
            rng.integers(120, 124, n, dtype=np.uint8),
        ]
    )
    raw = np.empty(4 * n, dtype=np.uint8)
    planes.join_planes(wanted, 1, raw)
    chunk = encode(torch.from_numpy(raw), 4, CodecConfig("zstd", 1))
    parts = chunk.codecs[0]["parts"]
    assert parts[0] == n and parts[2] == n and parts[1] < n // 4 and parts[3] < n // 2
    assert torch.equal(decode_new(bytes(chunk.data), chunk.codecs, chunk.crc32, raw.size), torch.from_numpy(raw))


def test_a_size_or_rotation_the_kernel_does_not_know_is_refused():
    raw = np.zeros(48, dtype=np.uint8)
    with pytest.raises(ValueError, match="no planes of size 4 rotated by 32"):
        planes.split_planes(raw, 4, 32)
    with pytest.raises(ValueError, match="contiguous"):
        planes.split_planes(raw[::2], 4, 1)
    with pytest.raises(ValueError, match="contiguous output"):
        planes.join_planes(np.zeros((4, 12), dtype=np.uint8), 1, np.zeros(47, dtype=np.uint8))


def test_planes_beat_the_bytegroup_chain_on_trained_like_bf16():
    raw = as_bytes(trained_like(torch.bfloat16, 1 << 18))
    planes_chunk = encode(raw, 2, CodecConfig("zstd", 1))
    grouped = raw.view(-1, 2).t().contiguous()
    stock = zstandard.ZstdCompressor(level=1).compress(bytes(grouped.numpy()))
    assert len(planes_chunk.data) < len(stock)


@pytest.mark.parametrize("level", [-3, 2, 3, 9])
def test_every_level_writes_planes_that_decode(level):
    raw = as_bytes(trained_like(torch.float32))
    chunk = encode(raw, 4, CodecConfig("zstd", level))
    assert chunk.codecs[0]["level"] == level
    assert torch.equal(decode_new(bytes(chunk.data), chunk.codecs, chunk.crc32, raw.numel()), raw)


@pytest.fixture(params=["libzstd", "stream"])
def decoder(request, monkeypatch):
    """Both ways a plane's frame is decoded: one shot through the system zstd, and streamed
    through python-zstandard where the system zstd is missing."""
    if request.param == "stream":
        monkeypatch.setattr(libzstd, "plane_decompressor", lambda: None)
    elif libzstd.plane_decompressor() is None:
        pytest.skip("no system zstd library here: frames are streamed through python-zstandard")
    return request.param


def test_without_the_system_zstd_the_binding_writes_readable_planes(monkeypatch):
    """Where libzstd cannot be loaded (another platform), python-zstandard encodes and decodes the planes."""
    monkeypatch.setattr(libzstd, "plane_compressor", lambda: None)
    monkeypatch.setattr(libzstd, "plane_decompressor", lambda: None)
    raw = as_bytes(trained_like(torch.bfloat16))
    chunk = encode(raw, 2, CodecConfig("zstd", 1))
    (spec,) = chunk.codecs
    assert spec["parts"][1] < len(raw) // 4  # the exponent plane still shrinks
    assert torch.equal(decode_new(bytes(chunk.data), chunk.codecs, chunk.crc32, raw.numel()), raw)


def test_the_system_zstd_is_used_where_present():
    # where the library loads, the faster setting must really be in use, not silently missing
    assert (libzstd.plane_compressor() is not None) == (libzstd._load() is not None)


def test_incompressible_floats_fall_back_to_the_empty_chain():
    gen = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=gen)
    chunk = encode(raw, 4, CodecConfig("zstd", 1))
    assert chunk.codecs == [] and bytes(chunk.data) == bytes(raw.numpy())


def test_a_chunk_decodes_through_an_emitter_as_well_as_directly(decoder):
    raw, stored, codecs, crc = chunk_of(torch.float32)
    pieces = torch.zeros_like(raw)

    def emit(first: int, stride: int, data: torch.Tensor) -> None:
        pieces[first : first + (data.numel() - 1) * stride + 1 : stride].copy_(data)

    from asyncckpt.codec import ChunkSource, decode_chunk

    decode_chunk(ChunkSource.of_bytes(stored, "chunk 1"), codecs, crc, raw.numel(), None, emit)
    assert torch.equal(pieces, raw)
    decode_chunk(ChunkSource.of_bytes(stored, "chunk 1"), codecs, crc, raw.numel())  # verify only


# ---- hostile entries -------------------------------------------------------------------------


def spec_with(**changes) -> dict:
    spec = {"id": "planes", "size": 4, "rotate": 1, "level": 1, "parts": [256, 256, 256, 100]}
    spec.update(changes)
    return spec


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (spec_with(size=3), ".codecs.size", r"expected 2, 4 or 8, got 3"),
        (spec_with(size=True), ".codecs.size", r"got True"),
        (spec_with(rotate=32), ".codecs.rotate", r"\[0, 31\], got 32"),
        (spec_with(level=10**9), ".codecs.level", r"got 1000000000"),
        (spec_with(parts=[256, 256, 256]), ".codecs.parts", r"a list of 4 part lengths"),
        (spec_with(parts=[256, 256, 257, 1]), ".codecs.parts", r"in \[1, 256\], got 257"),
        (spec_with(parts=[0, 256, 256, 1]), ".codecs.parts", r"got 0"),
        (spec_with(parts=[256, 256, 256, "1"]), ".codecs.parts", r"got '1'"),
    ],
)
def test_each_parameter_is_checked(spec, field, message):
    with pytest.raises(registry.ChainError, match=message) as info:
        registry.check_chain([spec], 1024, 868)
    assert info.value.field == field


def test_a_planes_chunk_storing_more_than_its_raw_length_is_refused():
    with pytest.raises(registry.ChainError, match="more than a planes frame"):
        registry.check_chain([spec_with()], 1024, 1025)


def test_parts_that_do_not_add_up_to_the_stored_length_are_damage(decoder):
    raw, stored, codecs, crc = chunk_of(torch.float32)
    spec = dict(codecs[0])
    spec["parts"] = [*spec["parts"][:3], spec["parts"][3] - 1]
    with pytest.raises(CheckpointDamagedError, match=r"chunk 4 stores \d+ bytes, its planes' parts add up to"):
        decode_new(stored, [spec], crc, raw.numel())


def test_a_flipped_byte_in_a_raw_plane_is_a_checksum_error(decoder):
    raw, stored, codecs, crc = chunk_of(torch.float32)
    damaged = bytearray(stored)
    damaged[10] ^= 0x01
    with pytest.raises(CheckpointDamagedError, match="checksum mismatch in chunk 4"):
        decode_new(bytes(damaged), codecs, crc, raw.numel())


def test_a_frame_with_trailing_bytes_inside_its_part_is_refused_even_with_a_matching_crc(decoder):
    raw, stored, codecs, _ = chunk_of(torch.float32)
    parts = codecs[0]["parts"]
    head = sum(parts[:3])
    frame = stored[head:]
    hostile = stored[:head] + frame + b"\x00" * 8
    spec = dict(codecs[0], parts=[*parts[:3], len(frame) + 8])
    with pytest.raises(CheckpointDamagedError, match="chunk 4 plane 3 holds 8 bytes after the end of its zstd frame"):
        decode_new(hostile, [spec], zlib.crc32(hostile), raw.numel())


def test_a_frame_declaring_another_size_than_its_plane_is_refused(decoder):
    raw, stored, codecs, _ = chunk_of(torch.float32)
    parts = codecs[0]["parts"]
    plane = raw.numel() // 4
    head = sum(parts[:3])
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(b"\x00" * (plane + 4))
    hostile = stored[:head] + frame
    spec = dict(codecs[0], parts=[*parts[:3], len(frame)])
    with pytest.raises(CheckpointDamagedError, match=f"chunk 4 plane 3 declares {plane + 4} bytes, expected {plane}"):
        decode_new(hostile, [spec], zlib.crc32(hostile), raw.numel())


def test_a_part_that_is_not_a_frame_is_refused(decoder):
    raw, stored, codecs, _ = chunk_of(torch.float32)
    parts = codecs[0]["parts"]
    head = sum(parts[:3])
    hostile = stored[:head] + b"\x01" * parts[3]
    with pytest.raises(CheckpointDamagedError, match="bad zstd frame in chunk 4 plane 3: no zstd frame header"):
        decode_new(hostile, codecs, zlib.crc32(hostile), raw.numel())


def test_a_flipped_byte_in_a_compressed_plane_is_a_checksum_error(decoder):
    raw, stored, codecs, crc = chunk_of(torch.float32)
    damaged = bytearray(stored)
    damaged[-20] ^= 0x40  # inside the exponent plane's frame
    with pytest.raises(CheckpointDamagedError, match="checksum mismatch in chunk 4"):
        decode_new(bytes(damaged), codecs, crc, raw.numel())


def test_a_skippable_frame_after_the_plane_frame_is_refused(decoder):
    """A one-shot zstd decode would skip a skippable frame: the part must be exactly one frame."""
    raw, stored, codecs, _ = chunk_of(torch.float32)
    parts = codecs[0]["parts"]
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"junk"
    hostile = stored + skippable
    spec = dict(codecs[0], parts=[*parts[:3], parts[3] + len(skippable)])
    with pytest.raises(CheckpointDamagedError, match="chunk 4 plane 3 holds 12 bytes after the end of its zstd frame"):
        decode_new(hostile, [spec], zlib.crc32(hostile), raw.numel())


def test_planes_after_a_reorder_codec_is_a_chain_the_format_does_not_define():
    """docs/format.md section 5: version 1 defines exactly [], [zstd], [bytegroup, zstd] and
    [planes]; a reader MUST refuse any other chain."""
    chain = [{"id": "bytegroup", "size": 4}, spec_with()]
    with pytest.raises(registry.ChainError, match="is not one this format defines"):
        registry.check_chain(chain, 1024, 868)


def test_join_planes_of_a_non_contiguous_array_reads_live_memory():
    """The contiguous copy join_planes hands the kernel must outlive the call (numpy frees a
    temporary as soon as ``.ctypes.data`` has been read)."""
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from asyncckpt.codec import planes\n"
        "n = 16 << 20  # a 64 MiB copy: glibc maps it apart and unmaps it when freed\n"
        "wide = np.random.default_rng(0).integers(0, 256, (4, 2 * n), dtype=np.uint8)\n"
        "view = wide[:, ::2]\n"
        "expected = np.empty(4 * n, dtype=np.uint8)\n"
        "planes._join_numpy(np.ascontiguousarray(view), 1, expected)\n"
        "out = np.empty(4 * n, dtype=np.uint8)\n"
        "for _ in range(3):\n"
        "    planes.join_planes(view, 1, out)\n"
        "    assert np.array_equal(out, expected), 'wrong bytes'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_parts_that_do_not_add_up_are_refused_when_the_manifest_is_read():
    with pytest.raises(registry.ChainError, match="its parts add up to 868 bytes, the chunk stores 867") as info:
        registry.check_chain([spec_with()], 1024, 867)
    assert info.value.field == ".codecs.parts"
    with pytest.raises(registry.ChainError, match="raw_length 1026 is not a multiple of the plane count 4"):
        registry.check_chain([spec_with()], 1026, 868)


def test_a_verify_decodes_every_part_without_keeping_planes(decoder):
    from asyncckpt.codec import ChunkSource, decode_chunk

    raw, stored, codecs, crc = chunk_of(torch.float32)
    decode_chunk(ChunkSource.of_bytes(stored, "chunk 4"), codecs, crc, raw.numel())  # a good chunk verifies
    parts = codecs[0]["parts"]
    hostile = stored + b"\x00" * 8
    spec = dict(codecs[0], parts=[*parts[:3], parts[3] + 8])
    with pytest.raises(CheckpointDamagedError, match="chunk 4 plane 3 holds 8 bytes after the end of its zstd frame"):
        decode_chunk(ChunkSource.of_bytes(hostile, "chunk 4"), [spec], zlib.crc32(hostile), raw.numel())


@pytest.mark.parametrize("kinds", ["RRRC", "CRRC", "RCRC", "CCCC", "RRCR", "CRRR"])
def test_each_planes_part_is_its_plane_or_a_frame_of_it_whichever_planes_shrink(kernel, kinds):
    """Planes are split into the output and coded there: a plane stored as it is after one that
    shrank moves down to its place, intact."""
    n = 1 << 14
    rng = np.random.default_rng(len(kinds) + kinds.count("C"))
    wanted = np.stack(
        [
            rng.integers(0, 4, n, dtype=np.uint8) if kind == "C" else rng.integers(0, 256, n, dtype=np.uint8)
            for kind in kinds
        ]
    )
    raw = np.empty(4 * n, dtype=np.uint8)
    planes.join_planes(wanted, 1, raw)
    chunk = encode(torch.from_numpy(raw), 4, CodecConfig("zstd", 1))
    (spec,) = chunk.codecs
    assert spec["id"] == "planes"
    stored = bytes(chunk.data)
    at = 0
    for kind, plane, length in zip(kinds, wanted, spec["parts"], strict=True):
        part = stored[at : at + length]
        at += length
        if kind == "R":
            assert part == plane.tobytes()
        else:
            assert length < n and zstandard.ZstdDecompressor().decompress(part) == plane.tobytes()
    assert at == len(stored) and zlib.crc32(stored) == chunk.crc32
    assert torch.equal(decode_new(stored, chunk.codecs, chunk.crc32, raw.size), torch.from_numpy(raw))


# ---- zplanes: a mask of the zero elements, planes of the rest --------------------------------


def with_zeros(dtype: torch.dtype, share: float, n: int = 1 << 15, seed: int = 3) -> torch.Tensor:
    """Trained-like values with about ``share`` of them exactly zero (a young Adam moment)."""
    values = trained_like(dtype, n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    values[torch.rand(n, generator=gen) < share] = 0
    return as_bytes(values)


@pytest.mark.parametrize("size", [2, 4, 8])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_compact_and_expand_match_their_definition(kernel, size, data):
    n = data.draw(st.integers(0, 300))
    words = np.array(
        data.draw(st.lists(st.sampled_from([0, 1, 0x80, 2**15, 2 ** (8 * size - 1)]), min_size=n, max_size=n)),
        dtype=WORD[size],
    )
    raw = words.view(np.uint8)
    kept, mask = planes.compact(raw, size)
    assert np.array_equal(kept.view(WORD[size]), words[words != 0])
    bits = [(int(mask[k // 8]) >> (k % 8)) & 1 for k in range(n)]
    assert bits == [int(w != 0) for w in words] and mask.size == -(-n // 8)
    assert n % 8 == 0 or int(mask[-1]) >> (n % 8) == 0  # no bit past the last element
    out = np.full(raw.size, 0xA5, dtype=np.uint8)
    assert planes.expand(mask.copy(), kept.copy(), size, out)
    assert np.array_equal(out, raw)


@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("share", [0.0, 0.05, 0.5, 1.0])
def test_compact_of_a_long_misaligned_chunk_keeps_every_nonzero_element_in_order(kernel, size, share):
    """Long enough for the 8-at-a-time loop with every mask byte, from a misaligned address, with
    a tail that is not a multiple of 8 elements."""
    n = 5003
    rng = np.random.default_rng(size)
    words = rng.integers(1, 2 ** (8 * size - 1), n, dtype=np.uint64).astype(WORD[size])
    words[rng.random(n) < share] = 0
    backing = np.zeros(n * size + 1, dtype=np.uint8)
    raw = backing[1:]
    raw[:] = words.view(np.uint8)
    kept, mask = planes.compact(raw, size)
    assert np.array_equal(kept.view(WORD[size]), words[words != 0])
    assert np.array_equal(np.unpackbits(mask, bitorder="little")[:n], (words != 0).astype(np.uint8))
    assert int(mask[-1]) >> (n % 8) == 0
    mask, kept = mask.copy(), kept.copy()
    out = np.full(raw.size + 1, 0xA5, dtype=np.uint8)[1:]  # misaligned too
    assert planes.expand(mask, kept, size, out)
    assert np.array_equal(out, raw)
    if kept.size:
        # a kept count the mask does not mark: refused, and no read past the kept elements
        assert not planes.expand(mask, kept[:-size].copy(), size, out)
        assert not planes.expand(mask, np.concatenate([kept, kept[:size]]), size, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("share", [0.3, 0.4, 0.9, 0.999])
def test_a_chunk_with_zeros_is_written_as_zplanes_and_decodes_bit_exact(kernel, decoder, dtype, share):
    raw = with_zeros(dtype, share)
    chunk = encode(raw, dtype.itemsize, CodecConfig("zstd", 1))
    (spec,) = chunk.codecs
    assert spec["id"] == "zplanes" and spec["size"] == dtype.itemsize and spec["rotate"] == 1
    words = raw.numpy().view(WORD[dtype.itemsize])
    assert spec["nonzero"] == int(np.count_nonzero(words))
    stored = bytes(chunk.data)
    assert zlib.crc32(stored) == chunk.crc32 and sum(spec["parts"]) == len(stored)
    registry.check_chain(chunk.codecs, raw.numel(), len(stored))
    assert torch.equal(decode_new(stored, chunk.codecs, chunk.crc32, raw.numel()), raw)


def test_each_zplanes_part_is_the_mask_or_a_plane_of_the_kept_elements(kernel):
    raw = with_zeros(torch.float32, 0.4)
    chunk = encode(raw, 4, CodecConfig("zstd", 1))
    (spec,) = chunk.codecs
    stored = bytes(chunk.data)
    words = raw.numpy().view(np.uint32)
    kept = words[words != 0]
    mask = np.packbits(words != 0, bitorder="little").tobytes()
    expected = [mask, *reference_planes(kept.tobytes(), 4, 1)]
    at = 0
    for piece, n in zip(expected, spec["parts"], strict=True):
        part = stored[at : at + n]
        at += n
        assert part == piece if n == len(piece) else zstandard.ZstdDecompressor().decompress(part) == piece
    assert at == len(stored)


def test_zeros_below_the_share_or_only_zeros_stay_planes():
    for share in (0.01, 1.0):
        chunk = encode(with_zeros(torch.float32, share), 4, CodecConfig("zstd", 1))
        assert chunk.codecs[0]["id"] == "planes", share


def test_the_zero_share_is_judged_from_runs_spread_over_the_chunk():
    n = 1 << 20  # a 4 MiB fp32 chunk
    words = np.arange(n, dtype=np.uint32)
    sample = planes._zero_sample(words)
    assert sample.shape == (64, n // 1024)  # a sixteenth of the chunk, in 64 contiguous runs
    starts = sample[:, 0]
    spacing = n // 64 - n // 1024 + 1
    assert np.array_equal(starts, np.arange(64, dtype=np.uint32) * spacing)
    assert np.array_equal(sample, starts[:, None] + np.arange(n // 1024, dtype=np.uint32))
    short = np.arange(1000, dtype=np.uint32)
    assert planes._zero_sample(short) is short  # too short for runs: all of it


@pytest.mark.parametrize("width", [1000, 3000, 2048, 4096, 8192, 16384, 32768, 65536])
def test_the_sample_sees_every_column_of_rows_of_any_width(width):
    """Rows of a power-of-two width must not put every run at the same columns. (Rows as wide as
    the sample itself, 65536 floats here, cannot all be covered by runs that overlap.)"""
    n = 1 << 20
    columns = planes._zero_sample(np.arange(n, dtype=np.int64)) % width
    covered = np.zeros(width, dtype=bool)
    covered[columns.reshape(-1)] = True
    assert covered.mean() >= (0.98 if width == 65536 else 1.0)


@pytest.mark.parametrize("width", [2048, 4096, 8192])
def test_zeros_in_columns_the_first_runs_miss_still_make_zplanes(width):
    rows = (np.random.default_rng(1).standard_normal(1 << 20) * 0.02).astype(np.float32).reshape(-1, width)
    rows[:, width // 4 :] = 0  # three quarters of the columns never updated
    raw = rows.reshape(-1).view(np.uint8).copy()
    stored, spec = planes.PLANES.encode_planes(raw, 4, 1, 1)
    assert spec["id"] == "zplanes" and stored.size < raw.size // 4


def test_a_low_plane_constant_in_most_columns_is_still_coded():
    rng = np.random.default_rng(1)
    n = 1 << 20
    wanted = np.stack([rng.integers(0, 256, n, dtype=np.uint8) for _ in range(4)])
    wanted[1].reshape(-1, 4096)[:, 1024:] = 7  # plane 1 constant in three quarters of the columns
    raw = np.empty(4 * n, dtype=np.uint8)
    planes.join_planes(wanted, 1, raw)
    parts = planes.PLANES.encode_planes(raw, 4, 1, 1)[1]["parts"]
    assert parts[1] < n // 2 and parts[0] == parts[2] == n


def test_a_zero_column_every_16th_element_is_seen_by_the_sample():
    """A dead input every 16 columns: one element in 16 is zero, which a sample of every 16th
    element would miss or overcount, depending on where it starts."""
    values = as_bytes(trained_like(torch.float32, 1 << 16, 5))
    words = values.numpy().view(np.uint32)
    words[7::16] = 0
    chunk = encode(values, 4, CodecConfig("zstd", 1))
    assert chunk.codecs[0]["id"] == "zplanes"
    assert torch.equal(decode_new(bytes(chunk.data), chunk.codecs, chunk.crc32, values.numel()), values)


def test_zplanes_store_a_young_moment_smaller_than_planes():
    raw = with_zeros(torch.float32, 0.4)
    zero_planes, _ = planes.ZPLANES.encode_zero_planes(raw.numpy(), 4, 1, 1)
    dense = sum(
        len(zstandard.ZstdCompressor(level=1).compress(p.tobytes())) for p in planes.split_planes(raw.numpy(), 4, 1)
    )
    assert zero_planes.size < 0.97 * dense


def test_a_zplanes_chunk_decodes_through_an_emitter_and_verifies(decoder):
    from asyncckpt.codec import ChunkSource, decode_chunk

    raw = with_zeros(torch.bfloat16, 0.5)
    chunk = encode(raw, 2, CodecConfig("zstd", 1))
    stored = bytes(chunk.data)
    pieces = torch.zeros_like(raw)

    def emit(first: int, stride: int, data: torch.Tensor) -> None:
        pieces[first : first + (data.numel() - 1) * stride + 1 : stride].copy_(data)

    decode_chunk(ChunkSource.of_bytes(stored, "chunk 2"), chunk.codecs, chunk.crc32, raw.numel(), None, emit)
    assert torch.equal(pieces, raw)
    decode_chunk(ChunkSource.of_bytes(stored, "chunk 2"), chunk.codecs, chunk.crc32, raw.numel())  # verify only


def zspec_with(**changes) -> dict:
    spec = {"id": "zplanes", "size": 4, "rotate": 1, "level": 1, "nonzero": 100, "parts": [32, 100, 100, 100, 50]}
    spec.update(changes)
    return spec


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (zspec_with(nonzero=0), ".codecs.nonzero", r"\[1, 255\], got 0"),
        (zspec_with(nonzero=256), ".codecs.nonzero", r"\[1, 255\], got 256"),
        (zspec_with(nonzero=True), ".codecs.nonzero", r"got True"),
        (zspec_with(parts=[32, 100, 100, 100]), ".codecs.parts", r"a list of 5 part lengths"),
        (zspec_with(parts=[33, 100, 100, 100, 50]), ".codecs.parts", r"in \[1, 32\], got 33"),
        (zspec_with(parts=[32, 100, 101, 100, 50]), ".codecs.parts", r"in \[1, 100\], got 101"),
        (zspec_with(size=3), ".codecs.size", r"expected 2, 4 or 8, got 3"),
    ],
)
def test_each_zplanes_parameter_is_checked(spec, field, message):
    with pytest.raises(registry.ChainError, match=message) as info:
        registry.check_chain([spec], 1024, 382)
    assert info.value.field == field


def test_a_zplanes_entry_without_nonzero_or_for_one_element_is_refused():
    entry = zspec_with()
    del entry["nonzero"]
    with pytest.raises(registry.ChainError, match="takes the parameters"):
        registry.check_chain([entry], 1024, 382)
    with pytest.raises(registry.ChainError, match="has no zeros to leave out"):
        registry.check_chain([zspec_with(nonzero=1, parts=[1, 1, 1, 1, 1])], 4, 5)


@pytest.mark.parametrize("where", ["a bit too many", "a bit too few", "a bit past the end"])
def test_a_mask_that_does_not_mark_nonzero_elements_is_damage(kernel, where):
    raw = with_zeros(torch.float32, 0.5, n=1003)
    stored, spec = planes.ZPLANES.encode_zero_planes(raw.numpy(), 4, 1, 1)
    assert spec["parts"][0] == 126  # the mask of 1003 elements, as it is (random zeros)
    mask = bytearray(stored[:126].tobytes())
    if where == "a bit too many":
        k = int(np.flatnonzero(raw.numpy().view(np.uint32) == 0)[0])
        mask[k // 8] |= 1 << (k % 8)
    elif where == "a bit too few":
        mask[0] ^= mask[0] & -mask[0]  # its lowest set bit cleared
    else:
        mask[-1] |= 0x80  # element 1007 of 1003
    hostile = bytes(mask) + stored[126:].tobytes()
    with pytest.raises(
        CheckpointDamagedError,
        match=rf"chunk 4: its zero mask does not mark exactly {spec['nonzero']} of its 1003 elements",
    ):
        decode_new(hostile, [spec], zlib.crc32(hostile), raw.numel())


def test_a_checkpoint_of_young_optimizer_state_round_trips_through_zplanes(tmp_path):
    from asyncckpt import CheckpointManager, load
    from asyncckpt.engine.reader import read_manifest

    net = torch.nn.Linear(256, 256)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 256)).relu().sum().backward()
    opt.step()
    with torch.no_grad():
        opt.state[net.weight]["exp_avg"][::2] = 0  # half its rows never updated
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(1, {"opt": opt})
        mgr.wait()
    manifest = read_manifest(next(tmp_path.glob("step-*")))
    assert "zplanes" in {c["id"] for chunk in manifest.chunks for c in chunk.codecs}
    loaded = load(tmp_path)
    assert torch.equal(loaded["opt"]["state"][0]["exp_avg"], opt.state[net.weight]["exp_avg"])
    assert torch.equal(loaded["opt"]["state"][0]["exp_avg_sq"], opt.state[net.weight]["exp_avg_sq"])


@pytest.mark.parametrize("where", ["a bit too many", "a bit past the end"])
def test_a_verify_finds_a_mask_that_does_not_mark_nonzero_elements(kernel, decoder, where):
    from asyncckpt.codec import ChunkSource, decode_chunk

    raw = with_zeros(torch.float32, 0.5, n=1003)
    stored, spec = planes.ZPLANES.encode_zero_planes(raw.numpy(), 4, 1, 1)
    mask = bytearray(stored[:126].tobytes())
    if where == "a bit too many":
        k = int(np.flatnonzero(raw.numpy().view(np.uint32) == 0)[0])
        mask[k // 8] |= 1 << (k % 8)
    else:
        mask[-1] |= 0x80  # element 1007 of 1003
    hostile = bytes(mask) + stored[126:].tobytes()
    with pytest.raises(CheckpointDamagedError, match=r"chunk 9: its zero mask does not mark exactly"):
        decode_chunk(ChunkSource.of_bytes(hostile, "chunk 9"), [spec], zlib.crc32(hostile), raw.numel())


# ---- plane 0 without its constant bottom bit (a tensor of one sign) ---------------------------


def reference_packed(plane: bytes) -> bytes:
    """docs/format.md's definition: the 7 upper bits of each byte as one little-endian bit stream."""
    bits = "".join(format(byte >> 1, "07b")[::-1] for byte in plane)  # least significant bit first
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[k : k + 8][::-1], 2) for k in range(0, len(bits), 8))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=300), bit=st.integers(0, 1), offset=st.integers(0, 7))
def test_a_plane_whose_bottom_bit_is_constant_packs_as_the_format_defines(kernel, data, bit, offset):
    buffer = np.zeros(offset + len(data), dtype=np.uint8)
    plane = buffer[offset:]
    plane[:] = (np.frombuffer(data, dtype=np.uint8) & 0xFE) | bit
    got = planes.pack_low_bit(plane)
    assert got is not None and got[0] == bit
    packed = got[1].copy()
    assert packed.tobytes() == reference_packed(plane.tobytes())
    assert packed.size == planes.packed_length(plane.size)
    back = np.full(offset + plane.size, 0xA5, dtype=np.uint8)
    assert planes.unpack_low_bit(packed, bit, back[offset:])
    assert np.array_equal(back[offset:], plane)
    if plane.size > 1:  # one byte of the other bit, anywhere: not packed
        mixed = plane.copy()
        mixed[len(data) * 7919 % plane.size] ^= 1
        assert planes.pack_low_bit(mixed) is None
    assert planes.pack_low_bit(plane[:0]) is None


def test_a_packed_plane_of_many_blocks_round_trips_and_one_stray_bit_at_the_end_is_seen(kernel):
    rng = np.random.default_rng(5)
    plane = rng.integers(0, 256, (1 << 16) + 5, dtype=np.uint8) & 0xFE
    bit, packed = planes.pack_low_bit(plane)
    back = np.empty_like(plane)
    assert bit == 0 and planes.unpack_low_bit(packed.copy(), 0, back) and np.array_equal(back, plane)
    plane[-1] |= 1  # in the tail, after every full block
    assert planes.pack_low_bit(plane) is None


def test_an_unused_bit_of_a_packed_plane_or_the_wrong_length_does_not_unpack(kernel):
    plane = np.arange(0, 254, 2, dtype=np.uint8)[:9]  # 9 bytes: 63 bits used of 64
    _, packed = planes.pack_low_bit(plane)
    packed = packed.copy()
    out = np.empty_like(plane)
    bad = packed.copy()
    bad[-1] |= 0x80
    assert not planes.unpack_low_bit(bad, 0, out)
    assert not planes.unpack_low_bit(packed[:-1], 0, out)


def one_signed(dtype: torch.dtype, sign: int, n: int = 1 << 15) -> torch.Tensor:
    """Trained-like magnitudes, all of one sign (an Adam exp_avg_sq, or its negation)."""
    return as_bytes(trained_like(dtype, n).abs().clamp_min(1e-30).to(dtype) * sign)


@pytest.mark.parametrize("sign", [1, -1], ids=["positive", "negative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_a_tensor_of_one_sign_stores_plane_0_packed_and_decodes_bit_exact(kernel, decoder, dtype, sign):
    raw = one_signed(dtype, sign)
    chunk = encode(raw, dtype.itemsize, CodecConfig("zstd", 1))
    (spec,) = chunk.codecs
    assert spec["id"] == "planes" and spec["low_bit"] == (0 if sign > 0 else 1)
    stored = bytes(chunk.data)
    plane0 = reference_planes(bytes(raw.numpy()), dtype.itemsize, 1)[0]
    expected = reference_packed(plane0)
    part = stored[: spec["parts"][0]]
    assert part == expected or zstandard.ZstdDecompressor().decompress(part) == expected
    assert torch.equal(decode_new(stored, chunk.codecs, chunk.crc32, raw.numel()), raw)


def test_packing_plane_0_stores_a_tensor_of_one_sign_no_larger_than_zstd_did():
    """What zstd's entropy coder took out of plane 0 was the constant bit: 8/7, which packing gets."""
    raw = one_signed(torch.float32, 1, 1 << 18)
    chunk = encode(raw, 4, CodecConfig("zstd", 1))
    (spec,) = chunk.codecs
    plane0 = planes.split_planes(raw.numpy(), 4, 1)[0]
    assert spec["parts"][0] <= len(zstandard.ZstdCompressor(level=1).compress(plane0.tobytes()))


def test_a_packed_plane_0_of_zeros_is_still_a_zstd_frame():
    """Whole numbers as floats: plane 0, and so its packing, is all zeros, which zstd still shrinks."""
    raw = as_bytes(torch.arange(1 << 15, dtype=torch.float32))
    chunk = encode(raw, 4, CodecConfig("zstd", 1))
    (spec,) = chunk.codecs
    assert spec["low_bit"] == 0 and spec["parts"][0] < 100
    assert torch.equal(decode_new(bytes(chunk.data), chunk.codecs, chunk.crc32, raw.numel()), raw)


def test_mixed_signs_keep_plane_0_whole():
    _, _, codecs, _ = chunk_of(torch.float32)
    assert "low_bit" not in codecs[0]


def test_a_young_second_moment_is_zplanes_with_plane_0_packed_and_verifies(kernel, decoder):
    from asyncckpt.codec import ChunkSource, decode_chunk

    raw = as_bytes(with_zeros(torch.float32, 0.3).view(torch.float32).abs())
    chunk = encode(raw, 4, CodecConfig("zstd", 1))
    (spec,) = chunk.codecs
    assert spec["id"] == "zplanes" and spec["low_bit"] == 0
    assert spec["parts"][1] <= planes.packed_length(spec["nonzero"])
    stored = bytes(chunk.data)
    assert torch.equal(decode_new(stored, chunk.codecs, chunk.crc32, raw.numel()), raw)
    decode_chunk(ChunkSource.of_bytes(stored, "chunk 2"), chunk.codecs, chunk.crc32, raw.numel())  # verify only


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (spec_with(low_bit=2), ".codecs.low_bit", r"\[0, 1\], got 2"),
        (spec_with(low_bit=True), ".codecs.low_bit", r"got True"),
        (spec_with(low_bit=0, parts=[225, 256, 256, 100]), ".codecs.parts", r"in \[1, 224\], got 225"),
        (zspec_with(low_bit=0, parts=[32, 89, 100, 100, 50]), ".codecs.parts", r"in \[1, 88\], got 89"),
        (spec_with(low_bits=0), "", r"takes the parameters \['level', 'parts', 'rotate', 'size'\] \(and optionally"),
    ],
)
def test_a_low_bit_and_its_packed_part_are_checked(spec, field, message):
    with pytest.raises(registry.ChainError, match=message) as info:
        registry.check_chain([spec], 1024, 700)
    assert info.value.field == field


@pytest.mark.parametrize("verify", [False, True], ids=["decode", "verify"])
def test_a_packed_plane_setting_an_unused_bit_is_damage_even_with_a_matching_crc(kernel, decoder, verify):
    from asyncckpt.codec import ChunkSource, decode_chunk

    raw = one_signed(torch.float32, 1, 1001)  # 1001 bytes a plane: 7007 bits, the last byte's top bit unused
    chunk = encode(raw, 4, CodecConfig("zstd", 1))
    (spec,) = chunk.codecs
    assert spec["parts"][0] == planes.packed_length(1001)  # stored as it is: its last byte is easy to reach
    hostile = bytearray(chunk.data)
    hostile[spec["parts"][0] - 1] |= 0x80
    crc = zlib.crc32(hostile)
    with pytest.raises(CheckpointDamagedError, match="chunk 4 plane 0: a packed plane sets bits past"):
        if verify:
            decode_chunk(ChunkSource.of_bytes(bytes(hostile), "chunk 4"), chunk.codecs, crc, raw.numel())
        else:
            decode_new(bytes(hostile), chunk.codecs, crc, raw.numel())
