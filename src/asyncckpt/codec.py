"""Encode and decode one chunk: byte-grouping, zstd, and the CRC32 of the stored bytes.

A chunk's codec chain is data (a list of small dicts recorded in the manifest), applied in order
on write and reversed on read, so a reader never guesses how a chunk was made. Byte-grouping
puts byte 0 of every element together, then byte 1, ...: the exponent bytes of floats become long
runs that zstd compresses far better than interleaved bytes (on trained weights: fp32 1.09x ->
1.22x, bf16 1.28x -> 1.49x; docs/performance.md).
"""

from __future__ import annotations

import ctypes
import sys
import threading
import zlib
from dataclasses import dataclass

import torch
import zstandard

from .errors import CheckpointError

_local = threading.local()  # zstd contexts are not thread-safe: one per thread

# Byte-grouped floats compress by Huffman-coding their exponent plane; the LZ matches that zstd's
# fast strategy (levels 1 and 2) hunts for are short and rare there, and taking them displaces
# well-coded literals. With zstd's smallest match table (64 entries, not level 1's 16K) the whole
# encode takes about half the CPU at about the same ratio (bench/codec.py, MiniLM: bf16 1.46 ->
# 1.49, fp32 1.206 -> 1.216; bench/stall.py's young MLP: 0.2-0.8% lower); runs of zeros and
# repeated rows are still found. Negative levels skip literal coding and levels >= 3 use other strategies:
# both keep zstd's own tables.
_GROUPED_HASH_LOG = 6
_GROUPED_FAST_LEVELS = (1, 2)

# Byte p of a little-endian element is (element >> 8p) mod 256, so a plane is one vectorized
# shift-and-narrow instead of a strided byte copy (1.3-3x faster, bench/codec.py).
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass(frozen=True)
class CodecConfig:
    compression: str | None = "zstd"
    level: int = 1

    def __post_init__(self) -> None:
        if self.compression not in ("zstd", None):
            raise ValueError(f"compression must be 'zstd' or None, got {self.compression!r}")
        if not -7 <= self.level <= 22:
            raise ValueError(f"zstd level must be in [-7, 22], got {self.level}")


@dataclass(frozen=True)
class EncodedChunk:
    data: bytes | memoryview
    codecs: list[dict]
    crc32: int


def tensor_memoryview(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (no numpy needed)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    array = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    array.owner = t  # the view keeps the tensor's memory alive, whatever the caller keeps
    return memoryview(array).cast("B")


def _compressor(level: int, grouped: bool) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    small_table = grouped and level in _GROUPED_FAST_LEVELS
    key = (level, small_table)
    if key not in cache:
        if small_table:
            params = zstandard.ZstdCompressionParameters.from_level(
                level, hash_log=_GROUPED_HASH_LOG, write_content_size=True
            )
            cache[key] = zstandard.ZstdCompressor(compression_params=params)
        else:
            cache[key] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[key]


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "decompressor", None)
    if dctx is None:
        dctx = _local.decompressor = zstandard.ZstdDecompressor()
    return dctx


def _as_ints(raw: torch.Tensor, size: int) -> torch.Tensor | None:
    """``raw`` viewed as little-endian integers of ``size`` bytes, where the host allows it."""
    as_int = _INT_OF_SIZE.get(size)
    if as_int is None or not _LITTLE_ENDIAN or raw.storage_offset() % size or raw.data_ptr() % size:
        return None
    return raw.view(as_int)


def _group_bytes(raw: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.empty(size, raw.numel() // size, dtype=torch.uint8)
    elements = _as_ints(raw, size)
    if elements is not None:
        for plane in range(size):
            out[plane].copy_(elements >> (8 * plane) if plane else elements)  # narrowing keeps byte 0
        return out
    # Elsewhere one strided copy per plane (~6x faster than a transpose().contiguous()).
    bytes_of = raw.view(-1, size)
    for plane in range(size):
        out[plane].copy_(bytes_of[:, plane])
    return out


def _ungroup_bytes(grouped: torch.Tensor, size: int, out: torch.Tensor) -> None:
    planes = grouped.view(size, -1)
    elements = _as_ints(out, size)
    if elements is not None:
        elements.copy_(planes[0])  # widening zero-extends
        for plane in range(1, size):
            elements.bitwise_or_(planes[plane].to(elements.dtype).bitwise_left_shift_(8 * plane))
        return
    bytes_of = out.view(-1, size)
    for plane in range(size):
        bytes_of[:, plane].copy_(planes[plane])


def bytegroup_size(dtype: torch.dtype) -> int:
    """Group the bytes of floating and complex elements wider than a byte; others stay as is."""
    if (dtype.is_floating_point or dtype.is_complex) and dtype.itemsize > 1:
        return dtype.itemsize
    return 1


def encode(raw: torch.Tensor, group: int, config: CodecConfig) -> EncodedChunk:
    """Encode a contiguous uint8 CPU tensor; fall back to raw bytes if zstd does not shrink it.

    Chains written: [] (raw), [zstd] (ints, bools, one-byte floats) and [bytegroup, zstd] (wider
    floats and complex).
    """
    view = tensor_memoryview(raw)
    if config.compression is None:
        return EncodedChunk(view, [], zlib.crc32(view))
    codecs: list[dict] = []
    source = view
    if group > 1:
        grouped = _group_bytes(raw, group)
        source = tensor_memoryview(grouped)  # the view keeps ``grouped`` alive
        codecs.append({"id": "bytegroup", "size": group})
    compressed = _compressor(config.level, group > 1).compress(source)
    codecs.append({"id": "zstd", "level": config.level})
    if len(compressed) >= len(view):
        return EncodedChunk(view, [], zlib.crc32(view))
    return EncodedChunk(compressed, codecs, zlib.crc32(compressed))


def _zstd_decompress(frame: bytes | memoryview, expected: int, what: str) -> bytes:
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CheckpointError(f"bad zstd frame in {what}: {exc}") from None
    if declared != expected:
        raise CheckpointError(f"zstd frame in {what} declares {declared} bytes, expected {expected}")
    try:
        data = _decompressor().decompress(frame, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise CheckpointError(f"cannot decompress {what}: {exc}") from None
    if len(data) != expected:
        raise CheckpointError(f"{what} decompressed to {len(data)} bytes, expected {expected}")
    return data


def decode(stored: bytes, codecs: list[dict], crc32: int, out: torch.Tensor, what: str) -> None:
    """Verify and decode a stored chunk into ``out`` (uint8, exactly the chunk's raw length).

    ``what`` names the chunk for error messages. Every zstd frame's declared size is checked
    before decompressing, so a hostile frame cannot make us allocate beyond the chunk.
    """
    actual = zlib.crc32(stored)
    if actual != crc32:
        raise CheckpointError(f"checksum mismatch in {what}: stored CRC32 {crc32:08x}, computed {actual:08x}")
    raw_length = out.numel()
    chain = tuple(codec["id"] for codec in codecs)
    if chain == ():
        data = stored
    elif chain == ("zstd",):
        data = _zstd_decompress(stored, raw_length, what)
    elif chain == ("bytegroup", "zstd"):
        data = _zstd_decompress(stored, raw_length, what)
    else:
        raise CheckpointError(f"codec chain {list(chain)} in {what} is not one this format defines")
    if len(data) != raw_length:
        raise CheckpointError(f"{what} holds {len(data)} bytes, expected {raw_length}")
    if chain and chain[0] == "bytegroup":
        _ungroup_bytes(_copy_to_tensor(data), codecs[0]["size"], out)
    else:
        _copy_into(out, data)


def _copy_into(out: torch.Tensor, data: bytes | memoryview) -> None:
    if len(data):
        ctypes.memmove(out.data_ptr(), bytes(data) if isinstance(data, memoryview) else data, len(data))


def _copy_to_tensor(data: bytes | memoryview) -> torch.Tensor:
    out = torch.empty(len(data), dtype=torch.uint8)
    _copy_into(out, data)
    return out
