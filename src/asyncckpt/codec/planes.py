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
and every element rotated right by R bits. An entry with ``"low_bit": B`` (a chunk of one sign:
bit 0 of plane 0, the rotated sign, is B throughout) stores plane 0 packed to 7 bits a byte
(:func:`pack_low_bit`), as it is or as a zstd frame of the packed bytes.

``zplanes`` (:class:`ZeroPlanesCodec`) is the same after leaving out the elements that are all zero
bits, with a mask of where they were: what a chunk that is 5% or more zeros is written as.
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
# From this share of elements that are all zero bits (young optimizer moments, pruned or never
# updated rows) a chunk is written as ``zplanes``: a bit per element, and planes of the rest only.
# Around it zstd starts entropy-coding the mantissa planes of the zeros' chunk (slowly, both ways);
# below it the mask and the spreading cost more than they save (bench/codec.py, young moments).
ZERO_SHARE = 0.05
# The share is judged from a sixteenth of the chunk, in 64 runs of contiguous elements spread over
# it (a 4 MiB fp32 chunk: 64 runs of 1024): every 16th element would be as many but touch every
# cache line of the chunk, as long as a full count. The runs are spaced a run's length less one
# apart from even spacing (see _zero_sample), so that in rows of any power-of-two width they start at
# columns spread over the whole row: evenly spaced runs in rows of 4096 floats all fell on
# columns 0-1023 and never saw the others.
_SAMPLE_RUNS = 64
_SAMPLE_SHARE = 16
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
        lib.asyncckpt_compact.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.asyncckpt_compact.restype = ctypes.c_size_t
        lib.asyncckpt_expand.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        lib.asyncckpt_expand.restype = ctypes.c_int
        lib.asyncckpt_pack_low7.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.asyncckpt_pack_low7.restype = ctypes.c_int
        lib.asyncckpt_unpack_low7.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.asyncckpt_unpack_low7.restype = None
    except (OSError, AttributeError):
        return None
    return lib


def compact(raw: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The elements of ``raw`` (uint8, a multiple of ``size`` long) that are not all zero bits, in
    order, and the mask of where they were (bit k, least significant first, set for element k).

    Both are per-thread scratch buffers, valid until this thread's next call.
    """
    n = raw.size // size
    mask = _scratch("mask", -(-n // 8))
    kept = _scratch("kept", raw.size)
    kernel = _kernel()
    if kernel is None:
        words = raw.view(_WORD[size])
        nonzero = words != 0
        mask[:] = np.packbits(nonzero, bitorder="little")
        m = int(np.count_nonzero(nonzero))
        kept.view(_WORD[size])[:m] = words[nonzero]
    else:
        m = kernel.asyncckpt_compact(raw.ctypes.data, n, size, kept.ctypes.data, mask.ctypes.data) if n else 0
    return kept[: m * size], mask


def _zero_sample(words: np.ndarray) -> np.ndarray:
    """The elements that judge a chunk's share of zeros: :data:`_SAMPLE_RUNS` runs of contiguous
    elements, a sixteenth of the chunk together (all of a chunk too short for that), as a view.

    Run k starts at k * (step - run + 1), step being an even share of the chunk: where a row of a
    power-of-two width divides the step, the runs start at columns -k * (run - 1) modulo the width,
    which tile the whole row (see the constants above).
    """
    run = words.size // (_SAMPLE_RUNS * _SAMPLE_SHARE)
    if run == 0:
        return words
    spacing = words.size // _SAMPLE_RUNS - run + 1
    return words[: _SAMPLE_RUNS * spacing].reshape(_SAMPLE_RUNS, spacing)[:, :run]


def _fits(mask: np.ndarray, n: int) -> bool:
    """Whether ``mask`` is one bit per element of ``n``, with no bit set past the last."""
    return mask.size == -(-n // 8) and not (n % 8 and mask.size and int(mask[-1]) >> (n % 8))


def _marks(mask: np.ndarray, n: int, m: int) -> bool:
    """Whether ``mask`` marks exactly ``m`` of ``n`` elements, and no bit past the last."""
    return _fits(mask, n) and int(np.unpackbits(mask).sum(dtype=np.int64)) == m


def expand(mask: np.ndarray, kept: np.ndarray, size: int, out: np.ndarray) -> bool:
    """The inverse of :func:`compact` into ``out`` (uint8, contiguous); False when the mask does not
    set exactly one bit per kept element, or sets bits past the last element."""
    n = out.size // size
    m = kept.size // size
    if not _fits(mask, n):
        return False
    kernel = _kernel()
    if kernel is None:
        nonzero = np.unpackbits(mask, count=n, bitorder="little").view(bool)
        if int(np.count_nonzero(nonzero)) != m:
            return False
        words = out.view(_WORD[size])
        words[:] = 0
        words[nonzero] = kept.view(_WORD[size])
        return True
    if not m:  # nothing kept: the kernel reads at least one kept element
        out[:] = 0
        return not mask.any()
    kept = np.ascontiguousarray(kept)
    return kernel.asyncckpt_expand(mask.ctypes.data, kept.ctypes.data, m, n, size, out.ctypes.data) == 0


def packed_length(n: int) -> int:
    """The bytes of a plane of ``n`` bytes stored without its constant bottom bit: 7 bits a byte."""
    return (7 * n + 7) // 8


_SEVEN_BITS = np.uint64(0x7F7F7F7F7F7F7F7F)
_LOW_BITS = np.uint64(0x0101010101010101)
# the shifts and masks that merge eight 7-bit fields of a 64-bit word into 56 bits, pairwise
_MERGES = (
    (np.uint64(0x007F007F007F007F), np.uint64(0x7F007F007F007F00), np.uint64(1)),
    (np.uint64(0x00003FFF00003FFF), np.uint64(0x3FFF00003FFF0000), np.uint64(2)),
    (np.uint64(0x000000000FFFFFFF), np.uint64(0x0FFFFFFF00000000), np.uint64(4)),
)
_SPLITS = (  # and back
    (np.uint64(0x000000000FFFFFFF), np.uint64(0x00FFFFFFF0000000), np.uint64(4)),
    (np.uint64(0x00003FFF00003FFF), np.uint64(0x0FFFC0000FFFC000), np.uint64(2)),
    (np.uint64(0x007F007F007F007F), np.uint64(0x3F803F803F803F80), np.uint64(1)),
)


def pack_low_bit(plane: np.ndarray) -> tuple[int, np.ndarray] | None:
    """``plane`` (contiguous uint8) stored without its bottom bit, when that bit is the same in every
    byte: the rotated sign of a tensor of one sign (Adam's ``exp_avg_sq``, a variance), which zstd
    would spend an entropy coder to take out. Returns the bit and the packed plane (a per-thread
    scratch buffer of :func:`packed_length` bytes, valid until this thread's next call), or None.

    The packed plane is the 7 upper bits of each byte as one little-endian bit stream: byte k's
    bits in stream bits [7k, 7k + 7), stream bit j being bit j % 8 of byte j / 8, the unused high
    bits of the last byte 0.
    """
    n = plane.size
    if n == 0:
        return None
    out = _scratch("packed", packed_length(n))
    kernel = _kernel()
    if kernel is not None:
        bit = kernel.asyncckpt_pack_low7(plane.ctypes.data, n, out.ctypes.data)
        return None if bit < 0 else (bit, out)
    bit = int(plane[0]) & 1
    if np.any((plane & 1) != bit):
        return None
    words, temp, stream = _low7_scratch(n)
    as_bytes = words.view(np.uint8)
    as_bytes[:n] = plane
    as_bytes[n:] = 0
    np.right_shift(words, np.uint64(1), out=words)
    np.bitwise_and(words, _SEVEN_BITS, out=words)
    for low, high, shift in _MERGES:
        np.bitwise_and(words, high, out=temp)
        np.right_shift(temp, shift, out=temp)
        np.bitwise_and(words, low, out=words)
        np.bitwise_or(words, temp, out=words)
    stream.reshape(-1, 7)[:] = as_bytes.reshape(-1, 8)[:, :7]
    out[:] = stream[: out.size]
    return bit, out


def _low7_scratch(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's packing of a plane of ``n`` bytes works in eight-byte words, little-endian whatever
    the host (each step writes ``out=``, so the words keep their byte order): two arrays of them,
    and the stream of seven bytes per word. All per-thread scratch buffers."""
    groups = -(-n // 8)
    words = _scratch("low7 words", 8 * groups).view("<u8")
    temp = _scratch("low7 temp", 8 * groups).view("<u8")
    return words, temp, _scratch("low7 stream", 7 * groups)


def packed_fits(packed: np.ndarray, n: int) -> bool:
    """Whether ``packed`` is a plane of ``n`` bytes packed by :func:`pack_low_bit`: its length, and
    no unused bit of its last byte set."""
    used = (7 * n) % 8
    return packed.size == packed_length(n) and not (used and int(packed[-1]) >> used)


def unpack_low_bit(packed: np.ndarray, bit: int, plane: np.ndarray) -> bool:
    """The inverse of :func:`pack_low_bit` into ``plane`` (contiguous uint8), ``bit`` in bit 0 of
    every byte; False when ``packed`` does not fit (:func:`packed_fits`)."""
    n = plane.size
    if not packed_fits(packed, n):
        return False
    if n == 0:
        return True
    kernel = _kernel()
    if kernel is not None:
        packed = np.ascontiguousarray(packed)
        kernel.asyncckpt_unpack_low7(packed.ctypes.data, n, bit, plane.ctypes.data)
        return True
    words, temp, stream = _low7_scratch(n)
    stream[: packed.size] = packed
    stream[packed.size :] = 0
    grouped = words.view(np.uint8).reshape(-1, 8)
    grouped[:, :7] = stream.reshape(-1, 7)
    grouped[:, 7] = 0
    for low, high, shift in _SPLITS:
        np.bitwise_and(words, high, out=temp)
        np.left_shift(temp, shift, out=temp)
        np.bitwise_and(words, low, out=words)
        np.bitwise_or(words, temp, out=words)
    np.left_shift(words, np.uint64(1), out=words)
    if bit:
        np.bitwise_or(words, _LOW_BITS, out=words)
    plane[:] = words.view(np.uint8)[:n]
    return True


def split_planes(raw: np.ndarray, size: int, rotate: int, into: np.ndarray | None = None) -> np.ndarray:
    """The planes of ``raw`` (uint8, a multiple of ``size`` long) as a (size, n) uint8 array:
    ``into`` (contiguous uint8 of ``raw``'s length) where given, else a per-thread scratch buffer,
    valid until this thread's next call.
    """
    if not raw.flags.c_contiguous:
        raise ValueError("split_planes needs contiguous bytes")
    if into is None:
        into = _scratch("planes", raw.size)
    elif not into.flags.c_contiguous or into.size != raw.size or into.dtype != np.uint8:
        raise ValueError("split_planes needs a contiguous uint8 output of the input's length")
    planes = into.reshape(size, raw.size // size)
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


def _check_layout(spec: Mapping[str, Any], raw_length: int) -> int:
    """``size``, ``rotate`` and ``level`` of a planes entry, checked; the size."""
    size = spec.get("size")
    if isinstance(size, bool) or size not in _WORD:
        raise ChainError(f"expected 2, 4 or 8, got {size!r}"[:200], ".codecs.size")
    if raw_length % size:
        raise ChainError(f"raw_length {raw_length} is not a multiple of the plane count {size}")
    int_param(spec, "rotate", 0, 8 * size - 1)
    int_param(spec, "level", *zstd.READ_LEVELS)
    return size


def _check_low_bit(spec: Mapping[str, Any]) -> None:
    """The entry's ``low_bit`` (plane 0 stored packed without it), when present, is 0 or 1.

    Raises:
        ChainError: it is not.
    """
    if "low_bit" in spec:
        int_param(spec, "low_bit", 0, 1)


def _plane_pieces(spec: Mapping[str, Any], plane_length: int, size: int) -> list[int]:
    """The length of each plane's piece: plane 0's packed when the entry has a ``low_bit``."""
    pieces = [plane_length] * size
    if "low_bit" in spec:
        pieces[0] = packed_length(plane_length)
    return pieces


def _check_parts(parts: Any, longest: list[int]) -> None:
    """One part length per stored piece, each in [1, that piece's length]."""
    if not isinstance(parts, list) or len(parts) != len(longest):
        raise ChainError(f"expected a list of {len(longest)} part lengths", ".codecs.parts")
    for n, most in zip(parts, longest, strict=True):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
            raise ChainError(f"expected part lengths in [1, {most}], got {n!r}"[:200], ".codecs.parts")


def _frame_of(piece: np.ndarray, level: int) -> np.ndarray | None:
    """One zstd frame of ``piece`` (in a per-thread scratch buffer, valid until this thread's next
    call) when that is shorter than the piece, else None."""
    fast = libzstd.plane_compressor() if level in zstd.GROUPED_FAST_LEVELS else None
    if fast is not None:
        frame = _scratch("frame", piece.size)
        n = fast.compress_into(piece, frame)  # 0: the frame would not be shorter than the piece
        return frame[:n] if 0 < n < piece.size else None
    coded = zstd.compressor(level, True).compress(piece.data)
    return np.frombuffer(coded, dtype=np.uint8) if len(coded) < piece.size else None


def _split_and_code(
    raw: np.ndarray, size: int, rotate: int, level: int, out: np.ndarray, at: int
) -> tuple[int, list[int], int | None]:
    """The planes of ``raw`` stored in ``out`` from ``at`` (room for all of ``raw`` there): where
    it ends, each plane's part length, and plane 0's constant bottom bit when it is stored packed
    without it (else None).

    The planes are split straight into ``out``, so a plane stored as it is (the nearly random low
    mantissa bytes) is never copied when the planes before it were stored as they are too, and
    moved down once otherwise; a plane that zstd shrinks is replaced by its frame. Plane 0, whose
    bottom bit is the sign, is first packed to 7 bits a byte when that bit is the same throughout
    (:func:`pack_low_bit`): zstd then has only the mantissa bits left, which it gives up on quickly
    instead of entropy-coding every byte to take out the one constant bit.
    """
    n = raw.size // size
    region = split_planes(raw, size, rotate, into=out[at : at + raw.size])
    base = out.ctypes.data
    parts: list[int] = []
    packed = pack_low_bit(region[0])
    if packed is not None:
        low_bit, piece = packed
        frame = _frame_of(piece, level)
        stored = piece if frame is None else frame
        out[at : at + stored.size] = stored  # shorter than plane 0, whose bytes are consumed
        parts.append(stored.size)
        at += stored.size
    for p in range(0 if packed is None else 1, size):
        plane = region[p]
        frame = _frame_of(plane, level)
        if frame is not None:
            out[at : at + frame.size] = frame  # ends inside plane p, whose bytes are consumed
            parts.append(frame.size)
            at += frame.size
            continue
        if plane.ctypes.data != base + at:
            ctypes.memmove(base + at, plane.ctypes.data, n)  # down, over consumed bytes only
        parts.append(n)
        at += n
    return at, parts, None if packed is None else packed[0]


def _code_into(piece: np.ndarray, target: np.ndarray, level: int) -> int:
    """``piece`` stored at the start of ``target`` (as long as it): one zstd frame when that is
    shorter, else the piece as it is; how many bytes it takes."""
    frame = _frame_of(piece, level)
    stored = piece if frame is None else frame
    target[: stored.size] = stored
    return stored.size


class PlanesCodec(CompressCodec):
    """Byte planes of floats, the exponent in one of them, each plane zstd-coded or stored as is."""

    name = "planes"
    params = frozenset({"size", "rotate", "level", "parts"})
    optional = frozenset({"low_bit"})
    selectable = False  # what compression "zstd" writes for floats, not a choice of its own
    after_reorder = False  # the format defines [planes] alone

    def check_params(self, spec: Mapping[str, Any], raw_length: int) -> None:
        """``size`` in {2, 4, 8} dividing the chunk, ``rotate`` in [0, 8 * size), a zstd
        ``level``, an optional ``low_bit`` of 0 or 1, and one part length per plane, each at most
        the length of the plane's piece (plane 0 packed when ``low_bit`` is present).

        Raises:
            ChainError: a parameter is not so.
        """
        size = _check_layout(spec, raw_length)
        _check_low_bit(spec)
        _check_parts(spec["parts"], _plane_pieces(spec, raw_length // size, size))

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
        stored, _ = self._encode_dense(raw, spec["size"], spec["rotate"], spec["level"])
        return stored.tobytes()

    def encode_planes(self, raw: np.ndarray, size: int, rotate: int, level: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The stored bytes of a chunk and its manifest entry.

        The planes are split straight into the output, which holds at most the chunk's raw length;
        a plane that zstd shrinks is then replaced by its frame, one that it does not is kept as it
        is (:func:`_split_and_code`).

        Args:
            raw: the chunk's bytes (uint8, a multiple of ``size`` long).
            size: the plane count (the float's size in bytes).
            rotate: bits to rotate each element left by first.
            level: the zstd level (1 and 2 use the exponent-plane setting).

        Returns:
            The stored bytes (a new array) and the entry.
        """
        words = raw.view(_WORD[size])
        sample = _zero_sample(words)
        zeros = sample.size - int(np.count_nonzero(sample))
        if words.size >= 1024 and sample.size * ZERO_SHARE <= zeros < sample.size:
            return ZPLANES.encode_zero_planes(raw, size, rotate, level)
        return self._encode_dense(raw, size, rotate, level)

    def _encode_dense(self, raw: np.ndarray, size: int, rotate: int, level: int) -> tuple[np.ndarray, dict[str, Any]]:
        """:meth:`encode_planes` of every element (no mask)."""
        out = np.empty(raw.size, dtype=np.uint8)
        at, parts, low_bit = _split_and_code(raw, size, rotate, level, out, 0)
        spec: dict[str, Any] = {"id": self.name, "size": size, "rotate": rotate, "level": level, "parts": parts}
        if low_bit is not None:
            spec["low_bit"] = low_bit
        return out[:at], spec

    def _read_parts(
        self, source: ChunkSource, parts: list[int], pieces: list[int], names: list[str], targets: list[Any]
    ) -> None:
        """Each stored part into its piece's target (None: read, checksummed and dropped): a part
        as long as its piece is the piece as is, a shorter one a zstd frame of it."""
        for stored, length, what, target in zip(parts, pieces, names, targets, strict=True):
            if stored == length:
                if target is None:
                    source.skip(stored)
                else:
                    source.fill(target.data)
            else:
                into = None if target is None else torch.from_numpy(target)
                self._decode_part(source, stored, length, into, what)

    def _read_planes(
        self,
        source: ChunkSource,
        parts: list[int],
        pieces: list[int],
        names: list[str],
        planes: list[Any],
        low_bit: int | None,
        plane_length: int,
    ) -> None:
        """``_read_parts`` of the planes' parts into ``planes`` (None each: a verify), plane 0
        unpacked when the entry stores it without its bottom bit (``low_bit``), its padding
        checked even by a verify."""
        if low_bit is None:
            self._read_parts(source, parts, pieces, names, planes)
            return
        packed = _scratch("unpacking", pieces[0])
        self._read_parts(source, parts, pieces, names, [packed, *planes[1:]])
        if planes[0] is None:
            fits = packed_fits(packed, plane_length)
        else:
            fits = unpack_low_bit(packed, low_bit, planes[0])
        if not fits:
            raise CheckpointDamagedError(f"{names[0]}: a packed plane sets bits past its last byte's values")

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

        The decode budget holds what this decode adds beyond the destination: the planes, plane
        0 packed when the entry has a ``low_bit``, a compressed part read whole (or a streamed
        frame's pieces), and a scratch output for ``emit``, numpy's join and numpy's unpacking
        where those are used.

        Raises:
            CheckpointDamagedError: the parts do not add up to the stored length, a frame does not
                decode to exactly its piece, or a packed plane sets bits past its last byte's
                values.
        """
        size, rotate, parts = spec["size"], spec["rotate"], spec["parts"]
        if sum(parts) != source.length:
            raise CheckpointDamagedError(
                f"{source.what} stores {source.length} bytes, its planes' parts add up to {sum(parts)}"
            )
        plane_length = raw_length // size
        pieces = _plane_pieces(spec, plane_length, size)
        low_bit = spec.get("low_bit")
        packing = 0 if low_bit is None else pieces[0]  # plane 0 read packed, then unpacked
        names = [f"{source.what} plane {p}" for p in range(size)]
        if direct is None and emit is None:
            with zstd.DECODE_BUDGET.hold(packing + zstd.frame_memory(plane_length)):
                self._read_planes(source, parts, pieces, names, [None] * size, low_bit, plane_length)
            return
        compressed = any(n < length for n, length in zip(parts, pieces, strict=True))
        one_shot = libzstd.plane_decompressor() is not None
        need = raw_length + packing  # the planes
        if compressed:
            need += plane_length if one_shot else zstd.frame_memory(plane_length)
        if direct is None:
            need += raw_length  # the joined chunk handed to emit
        if _kernel() is None:
            need += raw_length  # numpy's join widens a plane at a time into elements
            if packing:
                need += 3 * plane_length + 24  # and its unpacking works in words (_low7_scratch)
        with zstd.DECODE_BUDGET.hold(need):
            planes = _scratch("planes", raw_length).reshape(size, plane_length)
            self._read_planes(source, parts, pieces, names, list(planes), low_bit, plane_length)
            out = direct.numpy() if direct is not None else _scratch("joined", raw_length)
            join_planes(planes, rotate, out)
            if direct is None and emit is not None:
                emit(0, 1, torch.from_numpy(out))


class ZeroPlanesCodec(PlanesCodec):
    """``planes`` of the elements that are not all zero bits, after a mask of where they are.

    A young optimizer's moments are 40% exact zeros: their mantissa planes, random where the value
    is not zero, then compress about 1.5x, at the price of entropy-coding every byte. Without the
    zeros they are stored as they are, and only the mask and the exponent plane are coded.

    Manifest entry: ``{"id": "zplanes", "size": S, "rotate": R, "level": L, "nonzero": M, "parts":
    [n_mask, n_0, ..., n_S-1]}``. The first part is the mask (bit k, least significant first, set
    for each element k kept; ``ceil(N / 8)`` bytes for N elements), the others the S planes of the
    M kept elements, each M bytes (plane 0 packed into ``ceil(7 * M / 8)`` when the entry has a
    ``low_bit``, as for ``planes``); a part as long as its piece is it as is, a shorter one a zstd
    frame of it.
    """

    name = "zplanes"
    params = frozenset({"size", "rotate", "level", "nonzero", "parts"})
    optional = frozenset({"low_bit"})

    def check_params(self, spec: Mapping[str, Any], raw_length: int) -> None:
        """As ``planes``, plus ``nonzero`` in [1, N - 1] for N elements, and S + 1 parts: the
        mask's at most ``ceil(N / 8)``, each plane's at most its piece's length (``nonzero``, or
        plane 0 packed when ``low_bit`` is present).

        Raises:
            ChainError: a parameter is not so.
        """
        size = _check_layout(spec, raw_length)
        n = raw_length // size
        if n < 2:
            raise ChainError(f"a chunk of {n} element(s) has no zeros to leave out", ".codecs.nonzero")
        m = int_param(spec, "nonzero", 1, n - 1)
        _check_low_bit(spec)
        _check_parts(spec["parts"], [-(-n // 8), *_plane_pieces(spec, m, size)])

    def encode(self, data: memoryview, spec: Mapping[str, Any], *, reordered: bool) -> bytes:
        """The stored bytes, for a caller holding a full entry (the writer uses :meth:`encode_planes`)."""
        raw = np.frombuffer(data, dtype=np.uint8)
        stored, _ = self.encode_zero_planes(raw, spec["size"], spec["rotate"], spec["level"])
        return stored.tobytes()

    def encode_zero_planes(
        self, raw: np.ndarray, size: int, rotate: int, level: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The stored bytes of a chunk with some zero elements, and its entry.

        Raises:
            ValueError: the chunk has no zero element, or nothing but zeros.
        """
        kept, mask = compact(raw, size)
        m = kept.size // size
        if not 0 < m < raw.size // size:
            raise ValueError(f"zplanes needs both zero and non-zero elements, got {m} of {raw.size // size} non-zero")
        out = np.empty(mask.size + kept.size, dtype=np.uint8)
        mask_part = _code_into(mask, out, level)
        at, plane_parts, low_bit = _split_and_code(kept, size, rotate, level, out, mask_part)
        parts = [mask_part, *plane_parts]
        spec: dict[str, Any] = {
            "id": self.name,
            "size": size,
            "rotate": rotate,
            "level": level,
            "nonzero": m,
            "parts": parts,
        }
        if low_bit is not None:
            spec["low_bit"] = low_bit
        return out[:at], spec

    def decode(
        self,
        source: ChunkSource,
        raw_length: int,
        spec: Mapping[str, Any],
        direct: torch.Tensor | None,
        emit: Emit | None,
    ) -> None:
        """The mask and the kept elements' planes read (frames decompressed), the planes joined
        into the kept elements, then spread over ``direct`` or a scratch buffer handed to
        ``emit``, zeros between. A verify reads and decodes every part and keeps nothing.

        Raises:
            CheckpointDamagedError: the parts do not add up to the stored length, a frame does not
                decode to its piece's length, a packed plane sets bits past its last byte's
                values, or the mask does not mark exactly ``nonzero`` elements.
        """
        size, rotate, parts, m = spec["size"], spec["rotate"], spec["parts"], spec["nonzero"]
        if sum(parts) != source.length:
            raise CheckpointDamagedError(
                f"{source.what} stores {source.length} bytes, its mask's and planes' parts add up to {sum(parts)}"
            )
        n = raw_length // size
        pieces = [-(-n // 8), *_plane_pieces(spec, m, size)]
        low_bit = spec.get("low_bit")
        packing = 0 if low_bit is None else pieces[1]  # plane 0 read packed, then unpacked
        names = [f"{source.what} zero mask"] + [f"{source.what} plane {p}" for p in range(size)]

        def read(mask: np.ndarray, planes: list[Any]) -> None:
            self._read_parts(source, parts[:1], pieces[:1], names[:1], [mask])
            self._read_planes(source, parts[1:], pieces[1:], names[1:], planes, low_bit, m)

        if direct is None and emit is None:  # a verify: the mask kept and checked, the planes dropped
            with zstd.DECODE_BUDGET.hold(pieces[0] + packing + zstd.frame_memory(max(pieces))):
                mask = _scratch("zmask", pieces[0])
                read(mask, [None] * size)
                if not _marks(mask, n, m):
                    raise CheckpointDamagedError(
                        f"{source.what}: its zero mask does not mark exactly {m} of its {n} elements"
                    )
            return
        compressed = [length for stored, length in zip(parts, pieces, strict=True) if stored < length]
        one_shot = libzstd.plane_decompressor() is not None
        need = pieces[0] + packing + 2 * m * size  # the mask, the planes, the kept elements joined
        if compressed:
            need += max(compressed) if one_shot else zstd.frame_memory(max(compressed))
        if direct is None:
            need += raw_length  # the chunk handed to emit
        if _kernel() is None:
            need += m * size + n  # numpy's join widens a plane at a time; its expand, a bool per element
            if packing:
                need += 3 * m + 24  # and its unpacking works in words (_low7_scratch)
        with zstd.DECODE_BUDGET.hold(need):
            mask = _scratch("zmask", pieces[0])
            planes = _scratch("planes", m * size).reshape(size, m)
            read(mask, list(planes))
            kept = _scratch("zkept", m * size)
            join_planes(planes, rotate, kept)
            out = direct.numpy() if direct is not None else _scratch("joined", raw_length)
            if not expand(mask, kept, size, out):
                raise CheckpointDamagedError(
                    f"{source.what}: its zero mask does not mark exactly {m} of its {n} elements"
                )
            if direct is None and emit is not None:
                emit(0, 1, torch.from_numpy(out))


PLANES = PlanesCodec()
ZPLANES = ZeroPlanesCodec()
