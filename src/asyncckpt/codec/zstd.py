"""``zstd``: one zstd frame per chunk (a compress codec), decoded in bounded memory.

Manifest entry: ``{"id": "zstd", "level": L}``, L the level it was written with (informative: any
zstd decoder reads any level). The frame must declare its content size, which must equal the
chunk's raw length, and end exactly where the chunk's stored bytes do.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import zstandard

from asyncckpt.codec.registry import CompressCodec, Emit, int_param
from asyncckpt.codec.source import READ_PIECE, ChunkSource, piece_buffer, tensor_memoryview
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
GROUPED_FAST_LEVELS = (1, 2)

WRITE_LEVELS = (-7, 22)  # the levels a writer may ask for
READ_LEVELS = (-131072, 22)  # the levels a manifest may record (zstd's own range)

_FRAME_HEADER_MAX = 18  # ZSTD_FRAMEHEADERSIZE_MAX
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK_MAX = 128 << 10


def zstd_bound(raw_length: int) -> int:
    """The most bytes a zstd frame of ``raw_length`` bytes takes: ZSTD_COMPRESSBOUND, whose margin
    covers the frame header and checksum. Byte-grouping adds no framing.

    Args:
        raw_length: the decoded length.

    Returns:
        The bound in bytes.
    """
    margin = (_BLOCK_MAX - raw_length) >> 11 if raw_length < _BLOCK_MAX else 0
    return raw_length + (raw_length >> 8) + margin


def compressor(level: int, grouped: bool) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level``; byte planes (``grouped``) at levels 1-2 get the small match table."""
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    small_table = grouped and level in GROUPED_FAST_LEVELS
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

    def has_trailing_bytes(self, length: int) -> bool:
        return self.end is not None and self.end < length

    def check(self, length: int, what: str) -> None:
        if self.error is not None:
            raise CheckpointDamagedError(f"bad zstd frame in {what}: {self.error}")
        if self.end is None or self.end > length:
            raise CheckpointDamagedError(f"zstd frame in {what} is cut short (its blocks run past {length} bytes)")
        if self.end < length:
            raise CheckpointDamagedError(f"{what} holds {length - self.end} bytes after the end of its zstd frame")


class ZstdCodec(CompressCodec):
    """zstd frames (tuned for byte planes at levels 1-2), decoded through a shared memory budget."""

    name = "zstd"
    params = frozenset({"level"})

    def check_params(self, spec: Mapping[str, Any], raw_length: int) -> None:
        """``level`` is an integer in zstd's range.

        Raises:
            ChainError: it is not.
        """
        int_param(spec, "level", *READ_LEVELS)

    def spec(self, level: int) -> dict[str, Any]:
        """``{"id": "zstd", "level": level}``.

        Raises:
            ValueError: ``level`` is outside [-7, 22].
        """
        low, high = WRITE_LEVELS
        if not low <= level <= high:
            raise ValueError(f"zstd level must be in [{low}, {high}], got {level}")
        return {"id": self.name, "level": level}

    def bound(self, raw_length: int) -> int:
        """ZSTD_COMPRESSBOUND of ``raw_length`` (see :func:`zstd_bound`)."""
        return zstd_bound(raw_length)

    def encode(self, data: memoryview, spec: Mapping[str, Any], *, reordered: bool) -> bytes:
        """One frame that declares its content size; byte planes at levels 1-2 get a small match table."""
        return compressor(spec["level"], reordered).compress(data)

    def decode(
        self,
        source: ChunkSource,
        raw_length: int,
        spec: Mapping[str, Any],
        direct: torch.Tensor | None,
        emit: Emit | None,
    ) -> None:
        """Decompress the frame of ``source`` in pieces, refusing any frame that lies about its size.

        Raises:
            CheckpointDamagedError: no frame, a declared size other than ``raw_length``, or a
                frame that does not decompress to exactly that.
        """
        decode_frame(source, raw_length, direct, emit, source.what, budget=True)


def _frame_header(head: bytes, raw_length: int, what: str) -> tuple[zstandard.FrameParameters, _FrameWalker]:
    """The parameters of the frame ``head`` starts, and a walker for its blocks, for a frame that
    declares exactly ``raw_length`` bytes (checked before any decompression: a bomb is refused here).

    Raises:
        CheckpointDamagedError: no frame header, or another declared size.
    """
    if head[:4] != _ZSTD_MAGIC:
        raise CheckpointDamagedError(f"bad zstd frame in {what}: no zstd frame header")
    try:
        declared = zstandard.frame_content_size(head)
        params = zstandard.get_frame_parameters(head)
        header_size = zstandard.frame_header_size(head)
    except zstandard.ZstdError as exc:
        raise CheckpointDamagedError(f"bad zstd frame in {what}: {exc}") from None
    if declared != raw_length:
        raise CheckpointDamagedError(f"zstd frame in {what} declares {declared} bytes, expected {raw_length}")
    return params, _FrameWalker(header_size, params.has_checksum, raw_length)


def check_whole_frame(stored: memoryview, raw_length: int, what: str) -> None:
    """Check that ``stored`` is exactly one frame declaring ``raw_length`` bytes, with no bytes
    after it and no more blocks than a writer makes, before a one-shot decompression of it.

    Raises:
        CheckpointDamagedError: it is not.
    """
    _, walker = _frame_header(bytes(stored[:_FRAME_HEADER_MAX]), raw_length, what)
    walker.feed(stored, 0)
    walker.check(len(stored), what)


def frame_memory(raw_length: int) -> int:
    """The most memory decoding one frame of ``raw_length`` bytes holds: its window and read pieces."""
    return raw_length + 2 * _BLOCK_MAX + 2 * READ_PIECE


def decode_frame(
    source: ChunkSource,
    raw_length: int,
    direct: torch.Tensor | None,
    emit: Emit | None,
    what: str,
    *,
    budget: bool = False,
) -> None:
    """Decompress the one frame ``source`` holds, refusing any frame that lies about its size.

    Args:
        source: the stored bytes, exactly one frame.
        raw_length: what the frame must decode to.
        direct: uint8 tensor of exactly ``raw_length`` to decode into, or None.
        emit: used when ``direct`` is None (None: a verify).
        what: names the frame in error messages.
        budget: hold the decoder's memory in :data:`DECODE_BUDGET` (a caller that holds it for
            this frame already passes False).

    Raises:
        CheckpointDamagedError: no frame, a declared size other than ``raw_length``, or a frame
            that does not decompress to exactly that.
    """
    params, walker = _frame_header(source.peek(_FRAME_HEADER_MAX), raw_length, what)
    source.frame_check = walker
    window = min(params.window_size, raw_length) + 2 * _BLOCK_MAX
    with DECODE_BUDGET.hold(window + 2 * READ_PIECE) if budget else contextlib.nullcontext():
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
                piece, view = piece_buffer(raw_length)
                got = 0
                while got < raw_length:
                    n = reader.readinto(view[: raw_length - got])
                    if not n:
                        break
                    if emit is not None:
                        emit(got, 1, piece[:n])
                    got += n
            if got != raw_length:
                raise CheckpointDamagedError(f"{what} decompressed to {got} bytes, expected {raw_length}")
            if reader.read(1):
                raise CheckpointDamagedError(f"zstd frame in {what} holds more than the {raw_length} bytes it declares")
        except zstandard.ZstdError as exc:
            raise CheckpointDamagedError(f"cannot decompress {what}: {exc}") from None
        finally:
            reader.close()


ZSTD = ZstdCodec()
