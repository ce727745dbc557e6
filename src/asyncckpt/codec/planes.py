"""``planes``: floats stored as byte planes, exponent in a plane of its own, each plane coded apart.

A float's exponent is low-entropy (trained weights: ~2.6 bits of 8) and its mantissa bytes are
nearly random. Rotating every element left by ``rotate`` bits (1 for the IEEE and bfloat16
layouts) moves the sign bit to the bottom and the 8 exponent bits of fp32/bf16 into the top
byte, so one plane holds the whole exponent and nothing else. Then byte p of every element goes
to plane p, and each plane is stored as one zstd frame when that makes it smaller, or as it is
(mantissa planes, which no entropy coder shrinks: skipping them saves both the encode and the
decode). On the MiniLM weights this reaches the ratio of ZipNN, the float-specific coder whose
layout this follows (docs/performance.md, bench/codec.py).

Manifest entry: ``{"id": "planes", "size": S, "rotate": R, "level": L, "parts": [n_0, ..., n_S-1]}``.
The stored chunk is the parts one after another: part p is plane p's stored bytes, ``n_p`` long.
A part exactly one plane long (``raw_length / S``) is the plane as is; a shorter part is one zstd
frame of it (written at level L, informative). The decoded chunk is the planes interleaved back
and every element rotated right by R bits.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from asyncckpt.codec import libzstd, zstd
from asyncckpt.codec.registry import ChainError, CompressCodec, Emit, int_param
from asyncckpt.codec.source import ChunkSource
from asyncckpt.errors import CheckpointDamagedError

# elements as the format has them (little-endian), whatever the host's byte order
_WORD: dict[int, np.dtype] = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
SIZES = tuple(_WORD)  # the element sizes stored as planes
ROTATE = 1  # what a writer rotates by: the sign bit to the bottom, fp32/bf16 exponents byte-aligned
LITTLE_ENDIAN = sys.byteorder == "little"  # planes are written on little-endian hosts only

_local = threading.local()


_KEEP = 16 << 20  # scratch buffers up to this size stay with their thread; larger ones are freed


def _scratch(name: str, nbytes: int) -> np.ndarray:
    """A uint8 buffer of ``nbytes``, kept per thread and reused from chunk to chunk: fresh buffers
    of a chunk's size cost page faults that take as long as the work done in them. Buffers for
    chunks beyond the default size (up to 1 GiB) are not kept."""
    if nbytes > _KEEP:
        return np.empty(nbytes, dtype=np.uint8)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(name)
    if buf is None or buf.size < nbytes:
        buf = buffers[name] = np.empty(max(nbytes, 1), dtype=np.uint8)
    return buf[:nbytes]


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    """The compiled split and join (``_planes.c``, built at install where a C compiler is present),
    or None: numpy does the same work then, about 3-4x slower."""
    spec = importlib.util.find_spec("asyncckpt.codec._planes")
    if spec is None or not spec.origin or not LITTLE_ENDIAN:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
        for function in (lib.asyncckpt_split_planes, lib.asyncckpt_join_planes):
            function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
            function.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


def split_planes(raw: np.ndarray, size: int, rotate: int) -> np.ndarray:
    """The planes of ``raw`` (uint8, a multiple of ``size`` long) as a (size, n) uint8 array.

    The array is a per-thread scratch buffer, valid until this thread's next call.
    """
    if not raw.flags.c_contiguous:
        raise ValueError("split_planes needs contiguous bytes")
    planes = _scratch("planes", raw.size).reshape(size, raw.size // size)
    kernel = _kernel()
    if kernel is None:
        _split_numpy(raw, size, rotate, planes)
    elif raw.size and kernel.asyncckpt_split_planes(
        raw.ctypes.data, raw.size // size, size, rotate, planes.ctypes.data
    ):
        raise ValueError(f"no planes of size {size} rotated by {rotate}")
    return planes


def join_planes(planes: np.ndarray, rotate: int, out: np.ndarray) -> None:
    """The inverse of :func:`split_planes`: the (size, n) ``planes`` into the elements of ``out``."""
    size, n = planes.shape
    if not out.flags.c_contiguous or out.size != size * n:
        raise ValueError("join_planes needs a contiguous output of the planes' size")
    kernel = _kernel()
    if kernel is None:
        _join_numpy(planes, rotate, out)
    elif n:
        planes = np.ascontiguousarray(planes)  # held: a temporary's .ctypes.data is freed before the call
        if kernel.asyncckpt_join_planes(planes.ctypes.data, n, size, rotate, out.ctypes.data):
            raise ValueError(f"no planes of size {size} rotated by {rotate}")


def _split_numpy(raw: np.ndarray, size: int, rotate: int, planes: np.ndarray) -> None:
    """:func:`split_planes` where the compiled kernel is missing: plane p of the rotated elements
    is bits [8p - rotate, 8p - rotate + 8) of each element, a shift and a narrowing copy."""
    word = _WORD[size]
    bits = 8 * size
    words = raw.view(word)
    shifted = _scratch("shifted", raw.size).view(word)
    wrapped = _scratch("wrapped", raw.size).view(word)
    for p in range(size):
        low = 8 * p - rotate
        if low > 0:
            np.right_shift(words, low, out=shifted)
            np.copyto(planes[p], shifted, casting="unsafe")  # keeps the low byte
        elif low == 0:
            np.copyto(planes[p], words, casting="unsafe")
        else:  # the plane wraps round: its bottom bits come from the element's top
            np.left_shift(words, -low, out=shifted)
            np.right_shift(words, bits + low, out=wrapped)
            np.bitwise_or(shifted, wrapped, out=shifted)
            np.copyto(planes[p], shifted, casting="unsafe")


def _join_numpy(planes: np.ndarray, rotate: int, out: np.ndarray) -> None:
    """:func:`join_planes` where the compiled kernel is missing."""
    size, n = planes.shape
    word = _WORD[size]
    bits = 8 * size
    words = out.view(word)
    widened = _scratch("widened", out.size).view(word)
    np.copyto(words, planes[0], casting="unsafe")
    for p in range(1, size):
        np.copyto(widened, planes[p], casting="unsafe")
        np.left_shift(widened, 8 * p, out=widened)
        np.bitwise_or(words, widened, out=words)
    if rotate:  # rotate right: the bottom ``rotate`` bits (the sign) back to the top
        np.left_shift(words, bits - rotate, out=widened)
        np.right_shift(words, rotate, out=words)
        np.bitwise_or(words, widened, out=words)


class PlanesCodec(CompressCodec):
    """Byte planes of floats, the exponent in one of them, each plane zstd-coded or stored as is."""

    name = "planes"
    params = frozenset({"size", "rotate", "level", "parts"})
    selectable = False  # what compression "zstd" writes for floats, not a choice of its own
    after_reorder = False  # the format defines [planes] alone

    def check_params(self, spec: Mapping[str, Any], raw_length: int) -> None:
        """``size`` in {2, 4, 8} dividing the chunk, ``rotate`` in [0, 8 * size), a zstd
        ``level``, and one part length per plane, each at most the plane's length.

        Raises:
            ChainError: a parameter is not so.
        """
        size = spec.get("size")
        if isinstance(size, bool) or size not in _WORD:
            raise ChainError(f"expected 2, 4 or 8, got {size!r}"[:200], ".codecs.size")
        if raw_length % size:
            raise ChainError(f"raw_length {raw_length} is not a multiple of the plane count {size}")
        int_param(spec, "rotate", 0, 8 * size - 1)
        int_param(spec, "level", *zstd.READ_LEVELS)
        parts = spec.get("parts")
        if not isinstance(parts, list) or len(parts) != size:
            raise ChainError(f"expected a list of {size} part lengths", ".codecs.parts")
        plane = raw_length // size
        for n in parts:
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= plane:
                raise ChainError(f"expected part lengths in [1, {plane}], got {n!r}"[:200], ".codecs.parts")

    def check_stored(self, spec: Mapping[str, Any], length: int) -> None:
        """The parts add up to the chunk's stored length.

        Raises:
            ChainError: they do not.
        """
        total = sum(spec["parts"])
        if total != length:
            raise ChainError(f"its parts add up to {total} bytes, the chunk stores {length}", ".codecs.parts")

    def spec(self, level: int) -> dict[str, Any]:
        """The entry's fixed part for ``level`` (``size``, ``rotate`` and ``parts`` come from
        :meth:`encode_planes`).

        Raises:
            ValueError: ``level`` is outside [-7, 22].
        """
        zstd.ZSTD.spec(level)
        return {"id": self.name, "level": level}

    def bound(self, raw_length: int) -> int:
        """A part is never longer than its plane: at most ``raw_length`` stored bytes."""
        return raw_length

    def encode(self, data: memoryview, spec: Mapping[str, Any], *, reordered: bool) -> bytes:
        """The stored bytes, for a caller holding a full entry (the writer uses :meth:`encode_planes`)."""
        raw = np.frombuffer(data, dtype=np.uint8)
        stored, _ = self.encode_planes(raw, spec["size"], spec["rotate"], spec["level"])
        return stored.tobytes()

    def encode_planes(self, raw: np.ndarray, size: int, rotate: int, level: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The stored bytes of a chunk and its manifest entry.

        Each plane is compressed straight into its place in the output, which holds at most the
        chunk's raw length (a plane that does not shrink is stored as is).

        Args:
            raw: the chunk's bytes (uint8, a multiple of ``size`` long).
            size: the plane count (the float's size in bytes).
            rotate: bits to rotate each element left by first.
            level: the zstd level (1 and 2 use the exponent-plane setting).

        Returns:
            The stored bytes (a new array) and the entry.
        """
        planes = split_planes(raw, size, rotate)
        plane_length = raw.size // size
        out = np.empty(raw.size, dtype=np.uint8)
        fast = libzstd.plane_compressor() if level in zstd.GROUPED_FAST_LEVELS else None
        binding = None if fast is not None else zstd.compressor(level, True)
        at = 0
        parts: list[int] = []
        for plane in planes:
            target = out[at : at + plane_length]
            if fast is not None:
                n = fast.compress_into(plane, target)  # 0: the frame would not be shorter than the plane
            else:
                assert binding is not None
                frame = binding.compress(memoryview(plane))
                n = len(frame) if len(frame) < plane_length else 0
                target[:n] = np.frombuffer(frame, dtype=np.uint8)[:n]
            if not n or n >= plane_length:
                out[at : at + plane_length] = plane
                n = plane_length
            parts.append(n)
            at += n
        spec = {"id": self.name, "size": size, "rotate": rotate, "level": level, "parts": parts}
        return out[:at], spec

    @staticmethod
    def _decode_part(
        source: ChunkSource, stored: int, plane_length: int, target: torch.Tensor | None, what: str
    ) -> None:
        """One plane's zstd frame, the next ``stored`` bytes of ``source``, decoded into ``target``
        (None: a verify, decoded and dropped): bytes after the frame are named as such whatever the
        decoder made of them (as for a whole chunk's frame).

        With a target and the system zstd, the part is read whole (checksummed on the way),
        checked to be one frame of the plane's length, then decoded in one call straight into the
        plane; else it streams through python-zstandard in pieces."""
        dctx = libzstd.plane_decompressor() if target is not None else None
        if dctx is not None and target is not None:
            part = source.part(stored)
            try:
                buf = _scratch("part", stored)
                part.fill(buf.data)
                zstd.check_whole_frame(buf.data, plane_length, what)
                n = dctx.decompress_into(buf, target.numpy())
                if n != plane_length:
                    detail = n if isinstance(n, str) else f"decompressed to {n} bytes, expected {plane_length}"
                    raise CheckpointDamagedError(f"cannot decompress {what}: {detail}")
            finally:
                source.took(part)
            return
        part = source.part(stored)
        error: CheckpointDamagedError | None = None
        try:
            zstd.decode_frame(part, plane_length, target, None, what)
        except CheckpointDamagedError as exc:
            error = exc
        finally:
            source.took(part)  # every byte of the part read and checksummed, whatever happened
        check = part.frame_check
        if check is not None and check.has_trailing_bytes(part.length):
            check.check(part.length, what)
        if error is not None:
            raise error
        if check is not None:
            check.check(part.length, what)

    def decode(
        self,
        source: ChunkSource,
        raw_length: int,
        spec: Mapping[str, Any],
        direct: torch.Tensor | None,
        emit: Emit | None,
    ) -> None:
        """Read each part into its plane (zstd frames decompressed, raw parts read straight in),
        then interleave the planes into ``direct`` or a scratch buffer handed to ``emit``. A
        verify (neither) reads and decodes every part through pieces and keeps nothing.

        The decode budget holds what this decode adds beyond the destination: the planes, a
        compressed part read whole (or a streamed frame's pieces), and a scratch output for
        ``emit`` or numpy's join where those are used.

        Raises:
            CheckpointDamagedError: the parts do not add up to the stored length, or a frame does
                not decode to exactly one plane.
        """
        size, rotate, parts = spec["size"], spec["rotate"], spec["parts"]
        if sum(parts) != source.length:
            raise CheckpointDamagedError(
                f"{source.what} stores {source.length} bytes, its planes' parts add up to {sum(parts)}"
            )
        plane_length = raw_length // size
        if direct is None and emit is None:
            with zstd.DECODE_BUDGET.hold(zstd.frame_memory(plane_length)):
                for p, stored in enumerate(parts):
                    if stored == plane_length:
                        source.skip(stored)
                    else:
                        self._decode_part(source, stored, plane_length, None, f"{source.what} plane {p}")
            return
        compressed = any(n < plane_length for n in parts)
        one_shot = libzstd.plane_decompressor() is not None
        need = raw_length  # the planes
        if compressed:
            need += plane_length if one_shot else zstd.frame_memory(plane_length)
        if direct is None:
            need += raw_length  # the joined chunk handed to emit
        if _kernel() is None:
            need += raw_length  # numpy's join widens a plane at a time into elements
        with zstd.DECODE_BUDGET.hold(need):
            planes = _scratch("planes", raw_length).reshape(size, plane_length)
            for p, stored in enumerate(parts):
                if stored == plane_length:
                    source.fill(planes[p].data)
                else:
                    target = torch.from_numpy(planes[p])
                    self._decode_part(source, stored, plane_length, target, f"{source.what} plane {p}")
            out = direct.numpy() if direct is not None else _scratch("joined", raw_length)
            join_planes(planes, rotate, out)
            if direct is None and emit is not None:
                emit(0, 1, torch.from_numpy(out))


PLANES = PlanesCodec()
