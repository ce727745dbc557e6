"""Encode and decode one chunk: byte-grouping, zstd, and the CRC32 of the stored bytes.

A chunk's codec chain is data (a list of small dicts recorded in the manifest), applied in order
on write and reversed on read, so a reader never guesses how a chunk was made. Byte-grouping
puts byte 0 of every element together, then byte 1, ...: the exponent bytes of floats become long
runs that zstd compresses far better than interleaved bytes (on trained weights: fp32 1.09x ->
1.22x, bf16 1.28x -> 1.49x; docs/performance.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import zstandard

from asyncckpt.errors import CheckpointDamagedError

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


# ---- decoding: bounded memory whatever the stored bytes say ------------------------------------

READ_PIECE = 1 << 20  # stored bytes are read, checksummed and decompressed this many at a time
_FRAME_HEADER_MAX = 18  # ZSTD_FRAMEHEADERSIZE_MAX
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK_MAX = 128 << 10


def zstd_bound(raw_length: int) -> int:
    """The most bytes a zstd frame of ``raw_length`` bytes takes: ZSTD_COMPRESSBOUND, whose margin
    covers the frame header and checksum. Byte-grouping adds no framing."""
    margin = (_BLOCK_MAX - raw_length) >> 11 if raw_length < _BLOCK_MAX else 0
    return raw_length + (raw_length >> 8) + margin


class _Budget:
    """Memory for decoders in flight (zstd's window buffers), shared by every reading thread.

    A chunk waits until its decoder fits; one larger than the whole budget runs alone. With the
    read pieces, this bounds what a load holds beyond the tensors it returns, however many threads
    read and whatever window a (hostile) frame asks for (zstd itself refuses windows over 128 MiB).
    """

    def __init__(self, total: int) -> None:
        self._total = total
        self._used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._cond:
            while self._used and self._used + nbytes > self._total:
                self._cond.wait()
            self._used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._cond.notify_all()


DECODE_BUDGET = _Budget(192 << 20)


class _FrameWalker:
    """Follows the block headers of a zstd frame as its bytes stream past, to find where it ends.

    The decompressor stops at the end of the frame and says nothing about bytes after it, so a
    chunk with trailing garbage would otherwise verify. Block headers are 3 bytes (last-block bit,
    type, size); a frame the compressor wrote has at most one block per 512 raw bytes (zstd cuts
    128 KiB blocks, its block splitter at most 196 ways), so a hostile chain of empty blocks is
    refused after that many headers instead of costing time per byte.
    """

    def __init__(self, header_size: int, checksum: bool, raw_length: int) -> None:
        self.next = header_size  # where the next block header starts
        self.end: int | None = None  # where the frame ends, once its last block is seen
        self.checksum = checksum
        self.max_blocks = raw_length // 512 + 256
        self.blocks = 0
        self.error: str | None = None
        self._partial = b""  # a header cut by a piece boundary

    def feed(self, piece: memoryview, start: int) -> None:
        while self.end is None and self.error is None:
            at = self.next + len(self._partial) - start
            if at >= len(piece):
                return
            self._partial += bytes(piece[at : at + 3 - len(self._partial)])
            if len(self._partial) < 3:
                return
            header = int.from_bytes(self._partial, "little")
            self._partial = b""
            self.blocks += 1
            kind, size = (header >> 1) & 3, header >> 3
            if kind == 3:
                self.error = f"reserved block type at byte {self.next}"
            elif self.blocks > self.max_blocks:
                self.error = f"more than {self.max_blocks} blocks"
            self.next += 3 + (1 if kind == 1 else size)
            if header & 1:
                self.end = self.next + (4 if self.checksum else 0)

    def check(self, length: int, what: str) -> None:
        if self.error is not None:
            raise CheckpointDamagedError(f"bad zstd frame in {what}: {self.error}")
        if self.end is None or self.end > length:
            raise CheckpointDamagedError(f"zstd frame in {what} is cut short (its blocks run past {length} bytes)")
        if self.end < length:
            raise CheckpointDamagedError(f"{what} holds {length - self.end} bytes after the end of its zstd frame")


class ChunkSource:
    """The stored bytes of one chunk, handed out in pieces of at most READ_PIECE bytes.

    Every byte that passes is added to the CRC32 (and shown to the frame walker), so the checksum is
    computed in the same single pass that feeds the decompressor: the stored chunk is never held
    whole in memory. ``pread_into(view, pos)`` fills ``view`` from chunk byte ``pos``.
    """

    def __init__(self, length: int, pread_into: Callable[[memoryview, int], int], what: str) -> None:
        self.length = length
        self.pos = 0
        self.crc = 0
        self.what = what
        self.walker: _FrameWalker | None = None
        self._pread_into = pread_into

    @classmethod
    def of_bytes(cls, data: bytes | memoryview, what: str) -> ChunkSource:
        view = memoryview(data).cast("B")

        def pread_into(out: memoryview, pos: int) -> int:
            n = min(len(out), len(view) - pos)
            out[:n] = view[pos : pos + n]
            return n

        return cls(len(view), pread_into, what)

    @classmethod
    def of_file(cls, fd: int, offset: int, length: int, what: str) -> ChunkSource:
        def pread_into(out: memoryview, pos: int) -> int:
            try:
                return os.preadv(fd, [out], offset + pos)
            except OSError as exc:
                raise CheckpointDamagedError(f"cannot read {what}: {exc.strerror}") from exc

        return cls(length, pread_into, what)

    def peek(self, n: int) -> bytes:
        buf = bytearray(min(n, self.length))
        got = self._pread_into(memoryview(buf), 0)
        return bytes(buf[:got])

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` (or what is left of the chunk) with the next stored bytes."""
        n = min(len(view), self.length - self.pos)
        if n <= 0:
            return 0
        view = view[:n]
        done = 0
        while done < n:
            got = self._pread_into(view[done:], self.pos + done)
            if got <= 0:
                raise CheckpointDamagedError(f"short read of {self.what}: the file ends inside it")
            done += got
        self.crc = zlib.crc32(view, self.crc)
        if self.walker is not None:
            self.walker.feed(view, self.pos)
        self.pos += n
        return n

    def read(self, size: int = -1) -> bytearray:
        """For zstd's stream reader."""
        n = min(READ_PIECE if size is None or size < 0 else size, READ_PIECE, self.length - self.pos)
        buf = bytearray(max(0, n))
        self.readinto(memoryview(buf))
        return buf

    def drain(self) -> None:
        """Read the rest, for the checksum and the frame walk."""
        if self.pos < self.length:
            buf = memoryview(bytearray(min(READ_PIECE, self.length - self.pos)))
            while self.pos < self.length:
                self.readinto(buf)


# emit(first, stride, data): decoded bytes ``data[k]`` belong at chunk byte ``first + k * stride``
Emit = Callable[[int, int, torch.Tensor], None]


def decode_chunk(
    source: ChunkSource,
    codecs: list[dict],
    crc32: int,
    raw_length: int,
    direct: torch.Tensor | None = None,
    emit: Emit | None = None,
) -> None:
    """Verify and decode one stored chunk, reading it in pieces.

    ``direct`` (uint8, exactly ``raw_length``) receives the decoded bytes when one tensor holds the
    whole chunk: zstd then decompresses straight into it, and raw bytes are read straight into it.
    Otherwise the decoded bytes go to ``emit`` piece by piece (nowhere, for a verify). Memory beyond
    the destination is a few pieces and zstd's window, held through DECODE_BUDGET.

    Every stored byte is read and checksummed even when decoding fails early, so damage is reported
    as a checksum mismatch; a decoder error is reported when the checksum matches (a hostile chunk).
    """
    what = source.what
    chain = tuple(codec["id"] for codec in codecs)
    error: CheckpointDamagedError | None = None
    try:
        if chain == ():
            if source.length != raw_length:
                raise CheckpointDamagedError(f"{what} holds {source.length} bytes, expected {raw_length}")
            _copy_raw(source, raw_length, direct, emit)
        elif chain in (("zstd",), ("bytegroup", "zstd")):
            group = codecs[0]["size"] if chain[0] == "bytegroup" else 1
            _unzstd(source, raw_length, group, direct if group == 1 else None, emit)
        else:
            raise CheckpointDamagedError(f"codec chain {list(chain)} in {what} is not one this format defines")
    except CheckpointDamagedError as exc:
        error = exc
    source.drain()
    if source.crc != crc32:
        raise CheckpointDamagedError(
            f"checksum mismatch in {what}: stored CRC32 {crc32:08x}, computed {source.crc:08x}"
        ) from None
    walker = source.walker
    if walker is not None and walker.end is not None and walker.end < source.length:
        walker.check(source.length, what)  # trailing bytes: say so, whatever the decoder made of them
    if error is not None:
        raise error
    if walker is not None:
        walker.check(source.length, what)


def _piece_buffer(raw_length: int) -> tuple[torch.Tensor, memoryview]:
    piece = torch.empty(min(READ_PIECE, max(1, raw_length)), dtype=torch.uint8)
    return piece, tensor_memoryview(piece)


def _copy_raw(source: ChunkSource, raw_length: int, direct: torch.Tensor | None, emit: Emit | None) -> None:
    if direct is not None:
        view = tensor_memoryview(direct)
        for start in range(0, raw_length, READ_PIECE):
            source.readinto(view[start : start + READ_PIECE])
        return
    piece, view = _piece_buffer(raw_length)
    pos = 0
    while pos < raw_length:
        n = source.readinto(view)
        if emit is not None:
            emit(pos, 1, piece[:n])
        pos += n


def _emit_planes(emit: Emit, data: torch.Tensor, pos: int, raw_length: int, group: int) -> None:
    """Byte-grouped output is plane after plane (byte p of every element): plane bytes go to
    every ``group``-th byte of the destination, so ungrouping is a strided copy per piece."""
    if group == 1:
        emit(pos, 1, data)
        return
    plane_length = raw_length // group
    while data.numel():
        plane, element = divmod(pos, plane_length)
        n = min(data.numel(), plane_length - element)
        emit(element * group + plane, group, data[:n])
        data, pos = data[n:], pos + n


def _unzstd(source: ChunkSource, raw_length: int, group: int, direct: torch.Tensor | None, emit: Emit | None) -> None:
    what = source.what
    head = source.peek(_FRAME_HEADER_MAX)
    if head[:4] != _ZSTD_MAGIC:
        raise CheckpointDamagedError(f"bad zstd frame in {what}: no zstd frame header")
    try:
        declared = zstandard.frame_content_size(head)
        params = zstandard.get_frame_parameters(head)
        header_size = zstandard.frame_header_size(head)
    except zstandard.ZstdError as exc:
        raise CheckpointDamagedError(f"bad zstd frame in {what}: {exc}") from None
    if declared != raw_length:  # checked before any decompression: a bomb is refused here
        raise CheckpointDamagedError(f"zstd frame in {what} declares {declared} bytes, expected {raw_length}")
    source.walker = _FrameWalker(header_size, params.has_checksum, raw_length)
    window = min(params.window_size, raw_length) + 2 * _BLOCK_MAX
    with DECODE_BUDGET.hold(window + 2 * READ_PIECE):
        # a large window stays allocated in the decoder that used it: those get a decoder of their own
        dctx = _decompressor() if window <= 8 << 20 else zstandard.ZstdDecompressor()
        reader = dctx.stream_reader(
            source,  # type: ignore[arg-type]  # any object with read(n) will do
            read_size=READ_PIECE,
            read_across_frames=False,
            closefd=False,
        )
        try:
            if direct is not None:
                view = tensor_memoryview(direct)
                got = 0
                while got < raw_length:
                    n = reader.readinto(view[got:])
                    if not n:
                        break
                    got += n
            else:
                piece, view = _piece_buffer(raw_length)
                got = 0
                while got < raw_length:
                    n = reader.readinto(view[: raw_length - got])
                    if not n:
                        break
                    if emit is not None:
                        _emit_planes(emit, piece[:n], got, raw_length, group)
                    got += n
            if got != raw_length:
                raise CheckpointDamagedError(f"{what} decompressed to {got} bytes, expected {raw_length}")
            if reader.read(1):
                raise CheckpointDamagedError(f"zstd frame in {what} holds more than the {raw_length} bytes it declares")
        except zstandard.ZstdError as exc:
            raise CheckpointDamagedError(f"cannot decompress {what}: {exc}") from None
        finally:
            reader.close()


def decode(stored: bytes | memoryview, codecs: list[dict], crc32: int, out: torch.Tensor, what: str) -> None:
    """Verify and decode an in-memory stored chunk into ``out`` (uint8, exactly the raw length)."""
    decode_chunk(ChunkSource.of_bytes(stored, what), codecs, crc32, out.numel(), direct=out, emit=_into(out))


def _into(out: torch.Tensor) -> Emit:
    def emit(first: int, stride: int, data: torch.Tensor) -> None:
        n = data.numel()
        out[first : first + (n - 1) * stride + 1 : stride].copy_(data)

    return emit


def _ungroup_bytes(grouped: torch.Tensor, size: int, out: torch.Tensor) -> None:
    """The inverse of _group_bytes, as the reader does it (a strided copy per plane)."""
    _emit_planes(_into(out), grouped.reshape(-1), 0, out.numel(), size)
