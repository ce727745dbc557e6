"""asyncckpt.codec: chunk encode/decode, byte-grouping, the raw fallback, checksums, the codec registry."""

from __future__ import annotations

import zlib

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt import CheckpointError, codec
from asyncckpt.codec import CodecConfig, bytegroup_size, decode, encode, registry
from asyncckpt.codec import bytegroup as bytegroup_module
from asyncckpt.codec import zstd as zstd_module
from asyncckpt.errors import CheckpointDamagedError

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
        # the data is compressible, so a zstd path (not the raw fallback) is what ran: floats as planes
        if dtype.is_floating_point and dtype.itemsize > 1:
            assert [c["id"] for c in chunk.codecs] == ["planes"] and chunk.codecs[0]["level"] == config.level
        else:
            assert chunk.codecs == [{"id": "zstd", "level": config.level}]
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
def test_floats_record_their_planes_in_the_codec_chain(dtype):
    chunk = encode(as_bytes(sample(dtype)), bytegroup_size(dtype), CodecConfig("zstd", 1))
    (spec,) = chunk.codecs
    assert {k: v for k, v in spec.items() if k != "parts"} == {
        "id": "planes",
        "size": dtype.itemsize,
        "rotate": 1,
        "level": 1,
    }
    assert len(spec["parts"]) == dtype.itemsize and sum(spec["parts"]) == len(chunk.data)


def test_complex128_keeps_the_bytegroup_zstd_chain():
    raw = as_bytes(torch.randn(N // 4, dtype=torch.complex128, generator=torch.Generator().manual_seed(1)) * 0.02)
    chunk = encode(raw, bytegroup_size(torch.complex128), CodecConfig("zstd", 1))
    assert chunk.codecs == [{"id": "bytegroup", "size": 16}, {"id": "zstd", "level": 1}]
    assert torch.equal(decode_to_new(stored_copy(chunk), chunk.codecs, chunk.crc32, raw.numel()), raw)


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

    monkeypatch.setattr(zstd_module, "_decompressor", refuse)


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
    assert grouped.codecs[0]["id"] == "planes"
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
    grouped = bytegroup_module._group_bytes(raw, size)
    assert torch.equal(grouped, reference_grouping(raw, size))
    out_buffer = torch.full((offset + whole,), 0xA5, dtype=torch.uint8)
    bytegroup_module._ungroup_bytes(grouped.reshape(-1), size, out_buffer[offset:])
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
    grouped = bytegroup_module._group_bytes(raw, size)
    assert torch.equal(grouped, reference_grouping(raw, size))
    out = torch.empty_like(raw)
    bytegroup_module._ungroup_bytes(grouped.reshape(-1), size, out)
    assert torch.equal(out, raw)


def test_level_1_grouped_ratio_is_not_worse_than_stock_zstd_level_1():
    weights = as_bytes(sample(torch.bfloat16))
    stock = zstandard.ZstdCompressor(level=1).compress(bytes(reference_grouping(weights, 2).numpy()))
    chunk = encode(weights, 2, CodecConfig("zstd", 1))
    assert len(chunk.data) <= len(stock)


# ---- the registry: codecs looked up by the name the manifest records ----------------------------


def test_the_writers_codecs_are_registered_under_their_manifest_names():
    assert isinstance(registry.get("zstd"), registry.CompressCodec)
    assert isinstance(registry.get("bytegroup"), registry.ReorderCodec)
    assert isinstance(registry.get("planes"), registry.CompressCodec)
    assert registry.compressor_names() == ["zstd"]  # planes is what zstd writes for floats, not a choice
    chunk = encode(as_bytes(sample(torch.float32)), 4, CodecConfig("zstd", 1))
    assert [registry.get(spec["id"]).name for spec in chunk.codecs] == ["planes"]


def test_planes_cannot_be_asked_for_as_a_compression():
    with pytest.raises(ValueError, match=r"compression must be one of \['zstd'\] or None, got 'planes'"):
        CodecConfig("planes", 1)


def test_an_unknown_compression_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"compression must be one of \['zstd'\] or None, got 'lz4'"):
        CodecConfig("lz4", 1)


def test_a_level_is_checked_even_with_compression_off():
    CodecConfig(None, 22)
    with pytest.raises(ValueError, match=r"zstd level must be in \[-7, 22\], got 99"):
        CodecConfig(None, 99)


@pytest.mark.parametrize(
    ("codecs", "field", "message"),
    [
        ([{"id": "lz4"}], "", r"unknown codec \{'id': 'lz4'\}"),
        ([{"id": ["zstd"], "level": 1}], "", r"unknown codec"),
        (["zstd"], ".codecs", r"expected an object"),
        ([{"id": "zstd"}], "", r"codec 'zstd' takes the parameters \['level'\], got \[\]"),
        ([{"id": "zstd", "level": 1, "dict": 0}], "", r"codec 'zstd' takes .*got \['dict', 'level'\]"),
        ([{"id": "zstd", "level": "1"}], ".codecs.level", r"expected an integer in \[-131072, 22\], got '1'"),
        ([{"id": "zstd", "level": True}], ".codecs.level", r"got True"),
        ([{"id": "bytegroup", "size": 1}, {"id": "zstd", "level": 1}], ".codecs.size", r"in \[2, 16\], got 1"),
        ([{"id": "bytegroup", "size": 3}, {"id": "zstd", "level": 1}], "", r"not a multiple of the byte-group size"),
        ([{"id": "zstd", "level": 1}] * 5, "", r"at most 4 codecs"),
        ({"id": "zstd", "level": 1}, "", r"a list of at most 4 codecs"),
    ],
)
def test_each_codec_checks_its_own_parameters(codecs, field, message):
    with pytest.raises(registry.ChainError, match=message) as caught:
        registry.check_chain(codecs, 4096, 100)
    assert caught.value.field == field


@pytest.mark.parametrize(
    "ids",
    [["bytegroup"], ["zstd", "bytegroup"], ["bytegroup", "bytegroup", "zstd"], ["zstd", "zstd"]],
)
def test_chains_the_format_does_not_define_are_refused_by_shape(ids):
    specs = [{"id": "bytegroup", "size": 4} if i == "bytegroup" else {"id": "zstd", "level": 1} for i in ids]
    with pytest.raises(registry.ChainError, match=r"codec chain .* is not one this format defines"):
        registry.check_chain(specs, 4096, 100)
    out = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"codec chain .* in chunk 5 is not one this format defines"):
        decode(bytes(100), specs, zlib.crc32(bytes(100)), out, "chunk 5")


def test_stored_lengths_are_bounded_by_the_chain():
    zstd_chain = [{"id": "zstd", "level": 1}]
    registry.check_chain(zstd_chain, 4096, codec.zstd_bound(4096))
    with pytest.raises(registry.ChainError, match=r"more than a zstd frame of 4096 bytes ever takes"):
        registry.check_chain(zstd_chain, 4096, codec.zstd_bound(4096) + 1)
    registry.check_chain([], 4096, 4096)
    with pytest.raises(registry.ChainError, match="an uncompressed chunk must store exactly raw_length bytes"):
        registry.check_chain([], 4096, 4095)


class _Zlib(registry.CompressCodec):
    """A codec written the way a new one would be: its module, plus one registration line."""

    name = "zlib"
    params = frozenset({"level"})

    def check_params(self, spec, raw_length):
        registry.int_param(spec, "level", 0, 9)

    def spec(self, level):
        if not 0 <= level <= 9:
            raise ValueError(f"zlib level must be in [0, 9], got {level}")
        return {"id": self.name, "level": level}

    def bound(self, raw_length):
        return raw_length + (raw_length >> 12) + (raw_length >> 14) + 64

    def encode(self, data, spec, *, reordered):
        return zlib.compress(data, spec["level"])

    def decode(self, source, raw_length, spec, direct, emit):
        inflate = zlib.decompressobj()
        buf = memoryview(bytearray(codec.READ_PIECE))
        got = 0
        while source.pos < source.length:
            n = source.readinto(buf)
            out = inflate.decompress(buf[:n], raw_length - got + 1)
            if got + len(out) > raw_length:
                raise CheckpointDamagedError(f"{source.what} inflates past {raw_length} bytes")
            if out:
                piece = torch.frombuffer(bytearray(out), dtype=torch.uint8)
                if direct is not None:
                    direct[got : got + len(out)].copy_(piece)
                elif emit is not None:
                    emit(got, 1, piece)
                got += len(out)
        if got != raw_length or not inflate.eof:
            raise CheckpointDamagedError(f"{source.what} inflated to {got} bytes, expected {raw_length}")


@pytest.fixture
def zlib_codec():
    registry.register(_Zlib())
    yield
    registry._CODECS.pop("zlib")  # no public unregister: the library never needs one


def test_a_registered_codec_is_written_validated_and_read_by_name(zlib_codec, tmp_path):
    import asyncckpt
    from asyncckpt.engine.reader import read_manifest

    assert registry.compressor_names() == ["zlib", "zstd"]
    with pytest.raises(ValueError, match="zlib level must be in"):
        CodecConfig("zlib", 12)
    state = {"w": sample(torch.float32), "i": sample(torch.int64), "b": sample(torch.bool)}
    with asyncckpt.CheckpointManager(tmp_path, compression="zlib", level=6, chunk_size=1 << 16) as mgr:
        mgr.save(1, state).wait()
    manifest = read_manifest(tmp_path / "step-000000000001")
    chains = {tuple(c["id"] for c in chunk.codecs) for chunk in manifest.chunks}
    assert chains == {("bytegroup", "zlib"), ("zlib",)}
    assert all(chunk.codecs[-1] == {"id": "zlib", "level": 6} for chunk in manifest.chunks)
    loaded = asyncckpt.load(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(registry.ChainError, match=r"\.codecs\.level|in \[0, 9\], got 12"):
        registry.check_chain([{"id": "zlib", "level": 12}], 64, 64)
