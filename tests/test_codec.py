"""codec.py: chunk encode/decode, byte-grouping, the raw fallback and checksums."""

from __future__ import annotations

import zlib

import pytest
import torch
import zstandard

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
