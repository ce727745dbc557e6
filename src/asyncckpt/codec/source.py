"""The stored bytes of one chunk as a decoder reads them: in bounded pieces, checksummed on the way.

Every codec's decoder pulls stored bytes from a :class:`ChunkSource`, which adds each byte to the
chunk's CRC32 (and shows it to the decoder's frame check) in the same pass, so the stored chunk is
never held whole in memory and is checksummed exactly once.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Protocol

import torch

from asyncckpt.codec.crc import crc32
from asyncckpt.errors import CheckpointDamagedError

READ_PIECE = 1 << 20  # stored bytes are read, checksummed and decompressed this many at a time


def tensor_memoryview(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (no numpy needed).

    Args:
        t: a contiguous CPU tensor.

    Returns:
        A one-byte-per-element view of the tensor's memory that keeps the tensor alive, whatever
        the caller keeps.
    """
    assert t.is_contiguous() and t.device.type == "cpu"
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    array = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    array.owner = t  # type: ignore[attr-defined]  # the view keeps the tensor's memory alive
    return memoryview(array).cast("B")


class FrameCheck(Protocol):
    """What a decoder watches in the stored bytes as they stream past (zstd: its block headers), so
    a chunk with trailing garbage or a hostile framing is refused even when the decoder is not."""

    def feed(self, piece: memoryview, start: int) -> None:
        """See the stored bytes ``piece``, which begin at chunk byte ``start``."""

    def has_trailing_bytes(self, length: int) -> bool:
        """True when the frame is known to end before the ``length`` stored bytes do."""

    def check(self, length: int, what: str) -> None:
        """Raise CheckpointDamagedError unless exactly ``length`` stored bytes made one good frame."""


class ChunkSource:
    """The stored bytes of one chunk, handed out in pieces of at most READ_PIECE bytes.

    Every byte that passes is added to the CRC32 (and shown to the frame check), so the checksum is
    computed in the same single pass that feeds the decompressor: the stored chunk is never held
    whole in memory. ``pread_into(view, pos)`` fills ``view`` from chunk byte ``pos``.

    Args:
        length: the chunk's stored length in bytes.
        pread_into: fills a buffer from a chunk position and returns how many bytes it wrote.
        what: names the chunk in error messages ("chunk 3").
    """

    def __init__(self, length: int, pread_into: Callable[[memoryview, int], int], what: str) -> None:
        self.length = length
        self.pos = 0
        self.crc = 0
        self.what = what
        self.frame_check: FrameCheck | None = None  # set by a decoder before it reads
        self._pread_into = pread_into

    @classmethod
    def of_bytes(cls, data: bytes | memoryview, what: str) -> ChunkSource:
        """A source over stored bytes already in memory.

        Args:
            data: the stored bytes.
            what: names the chunk in error messages.

        Returns:
            The source.
        """
        view = memoryview(data).cast("B")

        def pread_into(out: memoryview, pos: int) -> int:
            n = min(len(out), len(view) - pos)
            out[:n] = view[pos : pos + n]
            return n

        return cls(len(view), pread_into, what)

    def peek(self, n: int) -> bytes:
        """The first ``n`` stored bytes (fewer if the chunk is shorter), outside the checksum pass."""
        buf = bytearray(min(n, self.length))
        got = self._pread_into(memoryview(buf), 0)
        return bytes(buf[:got])

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` (or what is left of the chunk) with the next stored bytes.

        Args:
            view: the buffer to fill.

        Returns:
            How many bytes were read (0 at the end of the chunk).

        Raises:
            CheckpointDamagedError: the file ends inside the chunk.
        """
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
        self.crc = crc32(view, self.crc)
        if self.frame_check is not None:
            self.frame_check.feed(view, self.pos)
        self.pos += n
        return n

    def fill(self, view: memoryview) -> None:
        """Fill all of ``view`` with the next stored bytes.

        Raises:
            CheckpointDamagedError: fewer are left in the chunk, or the file ends inside it.
        """
        if self.readinto(view) != len(view):
            raise CheckpointDamagedError(f"{self.what} ends inside one of its parts")

    def read(self, size: int = -1) -> bytearray:
        """For zstd's stream reader: the next piece of at most ``size`` (and READ_PIECE) bytes."""
        n = min(READ_PIECE if size is None or size < 0 else size, READ_PIECE, self.length - self.pos)
        buf = bytearray(max(0, n))
        self.readinto(memoryview(buf))
        return buf

    def part(self, length: int) -> ChunkSource:
        """The next ``length`` stored bytes as a source of their own (one plane's frame, say),
        continuing this source's CRC32; hand it back with :meth:`took` once decoded.

        Raises:
            CheckpointDamagedError: fewer than ``length`` stored bytes are left.
        """
        if length > self.length - self.pos:
            raise CheckpointDamagedError(f"{self.what} ends inside one of its parts")
        start, pread_into = self.pos, self._pread_into
        part = ChunkSource(length, lambda view, pos: pread_into(view, start + pos), self.what)
        part.crc = self.crc
        return part

    def took(self, part: ChunkSource) -> None:
        """Read the rest of ``part`` (from :meth:`part`) and continue after it."""
        try:
            part.drain()
        finally:
            self.crc = part.crc
            self.pos += part.pos

    def skip(self, length: int) -> None:
        """Read the next ``length`` stored bytes through a small piece (checksummed), keeping none."""
        end = min(self.length, self.pos + length)
        if self.pos >= end:
            return
        piece = memoryview(bytearray(min(READ_PIECE, end - self.pos)))
        while self.pos < end:
            if not self.readinto(piece[: end - self.pos]):
                break

    def drain(self) -> None:
        """Read the rest, for the checksum and the frame check."""
        self.skip(self.length - self.pos)


def piece_buffer(raw_length: int) -> tuple[torch.Tensor, memoryview]:
    """A reusable piece of at most READ_PIECE decoded bytes, as a tensor and as its byte view."""
    piece = torch.empty(min(READ_PIECE, max(1, raw_length)), dtype=torch.uint8)
    return piece, tensor_memoryview(piece)
