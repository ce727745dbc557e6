"""codec.py: chunk encode/decode, byte-grouping, the raw fallback and checksums."""

from __future__ import annotations

import zlib

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt import CheckpointError, codec
from asyncckpt.codec import CodecConfig, bytegroup_size, decode, encode

N = 1 << 15  # elements per test chunk


def sample(dtype: torch.dtype) -> torch.Tensor:
    """Compressible data of each kind, as a training state would hold it."""
    gen = torch.Generator().manual_seed(7)
    if dtype.is_floating_point:
        return (torch.randn(N, generator=gen, dtype=torch.float64) * 0.02).to(dtype)
    if dtype == torch.bool:
        return torch.rand(N, generator=gen) < 0.3
    if dtype == torch.uint8:
        return torch.randint(0, 16, (N,), generator=gen, dtype=torch.uint8)
    return torch.randint(-1000, 1000, (N,), generator=gen, dtype=dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def stored_copy(chunk) -> bytes:
    """What a reader gets back from the data file: an independent copy of the stored bytes."""
    return bytes(chunk.data)


def decode_to_new(stored, codecs, crc, raw_length) -> torch.Tensor:
    out = torch.full((raw_length,), 0xA5, dtype=torch.uint8)
    decode(stored, codecs, crc, out, "chunk 0 (state['w'])")
    return out


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]
CONFIGS = [CodecConfig("zstd", 1), CodecConfig("zstd", 3), CodecConfig(None)]


@pytest.mark.parametrize("config", CONFIGS, ids=["zstd1", "zstd3", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_round_trip_is_bit_exact(dtype, config):
    raw = as_bytes(sample(dtype))
    expected = bytes(raw.numpy())
    chunk = encode(raw, bytegroup_size(dtype), config)
    stored = stored_copy(chunk)
    assert chunk.crc32 == zlib.crc32(stored)
    if config.compression is None:
        assert chunk.codecs == [] and stored == expected
    else:
        # the data is compressible, so a zstd path (not the raw fallback) is what ran
        assert chunk.codecs[-1] == {"id": "zstd", "level": config.level}
        assert len(stored) < len(expected)
    out = decode_to_new(stored, chunk.codecs, chunk.crc32, raw.numel())
    assert bytes(out.numpy()) == expected


@pytest.mark.parametrize(
    ("dtype", "size"),
    [
        (torch.float32, 4),
        (torch.bfloat16, 2),
        (torch.float16, 2),
        (torch.float64, 8),
        (torch.complex64, 8),
        (torch.int64, 1),
        (torch.int32, 1),
        (torch.uint8, 1),
        (torch.bool, 1),
        (torch.float8_e4m3fn, 1),
    ],
)
def test_bytegroup_size_groups_wide_floats_only(dtype, size):
    assert bytegroup_size(dtype) == size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_floats_record_byte_grouping_in_the_codec_chain(dtype):
    chunk = encode(as_bytes(sample(dtype)), bytegroup_size(dtype), CodecConfig("zstd", 1))
    assert chunk.codecs[0] == {"id": "bytegroup", "size": dtype.itemsize}
    assert chunk.codecs == [{"id": "bytegroup", "size": dtype.itemsize}, {"id": "zstd", "level": 1}]


def test_a_bytegroup_zstd_chunk_made_by_another_writer_is_read():
    weights = torch.randn(1 << 14) * 0.02
    raw = as_bytes(weights)
    grouped = raw.view(-1, 4).t().contiguous().view(-1)
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(grouped.numpy()))
    codecs = [{"id": "bytegroup", "size": 4}, {"id": "zstd", "level": 1}]
    out = decode_to_new(frame, codecs, zlib.crc32(frame), raw.numel())
    assert torch.equal(out, raw)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_ints_are_not_byte_grouped(dtype):
    chunk = encode(as_bytes(sample(dtype)), bytegroup_size(dtype), CodecConfig("zstd", 1))
    assert chunk.codecs == [{"id": "zstd", "level": 1}]


@pytest.mark.parametrize("group", [1, 4])
def test_incompressible_bytes_fall_back_to_an_empty_codec_chain(group):
    gen = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=gen)
    chunk = encode(raw, group, CodecConfig("zstd", 3))
    stored = stored_copy(chunk)
    assert chunk.codecs == []
    assert stored == bytes(raw.numpy())
    assert chunk.crc32 == zlib.crc32(stored)
    assert torch.equal(decode_to_new(stored, [], chunk.crc32, raw.numel()), raw)


@pytest.mark.parametrize("config", [CodecConfig("zstd", 1), CodecConfig(None)], ids=["zstd", "none"])
def test_a_flipped_stored_byte_is_a_checksum_error(config):
    raw = as_bytes(sample(torch.float32))
    chunk = encode(raw, 4, config)
    stored = bytearray(stored_copy(chunk))
    stored[len(stored) // 2] ^= 0x10
    out = torch.zeros(raw.numel(), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"checksum mismatch in chunk 0 \(state\['w'\]\)"):
        decode(bytes(stored), chunk.codecs, chunk.crc32, out, "chunk 0 (state['w'])")


def test_wrong_recorded_crc_is_a_checksum_error():
    raw = as_bytes(sample(torch.int64))
    chunk = encode(raw, 1, CodecConfig("zstd", 1))
    out = torch.zeros(raw.numel(), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="checksum"):
        decode(stored_copy(chunk), chunk.codecs, chunk.crc32 ^ 1, out, "chunk 3")


def _no_decompression(monkeypatch):
    def refuse():
        raise AssertionError("decode must not decompress a frame whose declared size is wrong")

    monkeypatch.setattr(codec, "_decompressor", refuse)


def test_zstd_frame_declaring_more_than_the_chunk_is_refused_before_decompressing(monkeypatch):
    raw_length = 4096
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(8 * raw_length))
    assert zstandard.frame_content_size(frame) == 8 * raw_length
    _no_decompression(monkeypatch)
    out = torch.zeros(raw_length, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"zstd frame in chunk 9 declares 32768 bytes, expected 4096"):
        decode(frame, [{"id": "zstd", "level": 1}], zlib.crc32(frame), out, "chunk 9")
    assert not out.any()


def test_zstd_frame_without_a_declared_size_is_refused(monkeypatch):
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(1024))
    _no_decompression(monkeypatch)
    out = torch.zeros(1024, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="declares -1 bytes, expected 1024"):
        decode(frame, [{"id": "zstd", "level": 1}], zlib.crc32(frame), out, "chunk 0")


def test_garbage_with_a_matching_crc_is_a_bad_frame_error():
    junk = b"definitely not a zstd frame"
    out = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="bad zstd frame in chunk 1"):
        decode(junk, [{"id": "zstd", "level": 1}], zlib.crc32(junk), out, "chunk 1")


def test_raw_chunk_of_the_wrong_length_is_an_error():
    data = bytes(100)
    out = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="holds 100 bytes, expected 64"):
        decode(data, [], zlib.crc32(data), out, "chunk 2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_byte_grouping_compresses_trained_like_weights_better(dtype):
    gen = torch.Generator().manual_seed(11)
    weights = (torch.randn(1 << 18, generator=gen) * 0.02).to(dtype)
    raw = as_bytes(weights)
    config = CodecConfig("zstd", 1)
    grouped = encode(raw, dtype.itemsize, config)
    plain = encode(raw, 1, config)
    assert grouped.codecs[0] == {"id": "bytegroup", "size": dtype.itemsize}
    assert len(grouped.data) < len(plain.data)
    out = decode_to_new(stored_copy(grouped), grouped.codecs, grouped.crc32, raw.numel())
    assert torch.equal(out, raw)


@pytest.mark.parametrize(("compression", "level"), [("gzip", 1), ("zstd", 23), ("zstd", -8), ("", 1)])
def test_invalid_codec_config_is_a_value_error(compression, level):
    with pytest.raises(ValueError, match="compression|level"):
        CodecConfig(compression, level)


def test_tensor_memoryview_keeps_its_tensor_alive():
    view = codec.tensor_memoryview(torch.full((1 << 20,), 7, dtype=torch.uint8))
    churn = [torch.zeros(1 << 20, dtype=torch.uint8) for _ in range(16)]  # reuse freed memory
    assert set(bytes(view[:4096])) == {7}
    del churn


def reference_grouping(raw: torch.Tensor, size: int) -> torch.Tensor:
    """Byte p of every element, then byte p + 1: the format's definition, written the slow way."""
    return raw.view(-1, size).t().contiguous()


@pytest.mark.parametrize("size", [2, 4, 8, 16])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=0, max_size=4096))
def test_byte_grouping_matches_the_format_definition_for_any_bytes(size, offset, data):
    whole = len(data) - len(data) % size
    buffer = torch.zeros(offset + whole, dtype=torch.uint8)
    raw = buffer[offset:]  # offset 1 takes the strided path, offset 0 the integer-shift path
    if whole:
        raw.copy_(torch.frombuffer(bytearray(data[:whole]), dtype=torch.uint8))
    grouped = codec._group_bytes(raw, size)
    assert torch.equal(grouped, reference_grouping(raw, size))
    out_buffer = torch.full((offset + whole,), 0xA5, dtype=torch.uint8)
    codec._ungroup_bytes(grouped.reshape(-1), size, out_buffer[offset:])
    assert torch.equal(out_buffer[offset:], raw)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_byte_grouping_round_trips_every_value_of_every_byte(dtype):
    # every 16-bit pattern, and for 32 bits every byte value in every position with the sign set
    if dtype == torch.int16:
        values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    else:
        byte = torch.arange(256, dtype=torch.int64)
        values = torch.cat([(byte << (8 * p)) | (0x80 << 24) for p in range(4)] + [byte * 0x01010101]).to(torch.int32)
    raw = values.view(torch.uint8)
    size = dtype.itemsize
    grouped = codec._group_bytes(raw, size)
    assert torch.equal(grouped, reference_grouping(raw, size))
    out = torch.empty_like(raw)
    codec._ungroup_bytes(grouped.reshape(-1), size, out)
    assert torch.equal(out, raw)


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_chunks_are_plain_zstd_frames_any_reader_decodes(dtype, level):
    raw = as_bytes(sample(dtype))
    chunk = encode(raw, dtype.itemsize, CodecConfig("zstd", level))
    assert chunk.codecs == [{"id": "bytegroup", "size": dtype.itemsize}, {"id": "zstd", "level": level}]
    stock = zstandard.ZstdDecompressor().decompress(stored_copy(chunk))
    assert stock == bytes(reference_grouping(raw, dtype.itemsize).numpy())


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(1 << 18),
        lambda: torch.ones(1 << 18).bfloat16(),
        lambda: torch.randn(1024, generator=torch.Generator().manual_seed(5)).repeat(256),
    ],
    ids=["zeros", "ones-bf16", "repeated-rows"],
)
def test_level_1_grouped_chunks_still_find_long_repeats(make):
    # the small match table must not lose runs and repeated rows (LayerNorm ones, zero moments)
    raw = as_bytes(make())
    chunk = encode(raw, bytegroup_size(make().dtype), CodecConfig("zstd", 1))
    assert len(chunk.data) * 100 < raw.numel()


def test_level_1_grouped_ratio_is_not_worse_than_stock_zstd_level_1():
    weights = as_bytes(sample(torch.bfloat16))
    stock = zstandard.ZstdCompressor(level=1).compress(bytes(reference_grouping(weights, 2).numpy()))
    chunk = encode(weights, 2, CodecConfig("zstd", 1))
    assert len(chunk.data) <= len(stock)
