"""Encode and decode one chunk through its codec chain, with the CRC32 of the stored bytes.

A chunk's codec chain is data (a list of small dicts recorded in the manifest), applied in order
on write and reversed on read, so a reader never guesses how a chunk was made. The writer's chains
are [] (stored as is), [zstd] (ints, bools, one-byte floats), [planes] (2-, 4- and 8-byte floats
and complex64) and [bytegroup, zstd] (complex128, and every float in checkpoints written before
``planes``); the codecs themselves live in the registry (``asyncckpt.codec.registry``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncckpt.codec import crc, planes, registry
from asyncckpt.codec.bytegroup import BYTEGROUP
from asyncckpt.codec.registry import Emit, emit_into
from asyncckpt.codec.source import READ_PIECE, ChunkSource, piece_buffer, tensor_memoryview
from asyncckpt.errors import CheckpointDamagedError


@dataclass(frozen=True)
class CodecConfig:
    """How a writer encodes chunks.

    Args:
        compression: the name of a registered compress codec ("zstd"), or None to store chunks
            as they are.
        level: the compression level, as that codec takes it (zstd: -7 to 22; checked as zstd's
            when ``compression`` is None).

    Raises:
        ValueError: an unknown compression or a level the codec refuses.
    """

    compression: str | None = "zstd"
    level: int = 1

    def __post_init__(self) -> None:
        # with compression off the level is still checked, as zstd's: a typo fails at once either way
        registry.compressor("zstd" if self.compression is None else self.compression).spec(self.level)


@dataclass(frozen=True)
class EncodedChunk:
    """One encoded chunk: its stored bytes, the chain that made them, and their CRC32."""

    data: bytes | memoryview
    codecs: list[dict]
    crc32: int


def encode(raw: torch.Tensor, group: int, config: CodecConfig) -> EncodedChunk:
    """Encode a contiguous uint8 CPU tensor; fall back to raw bytes if compression does not shrink it.

    Args:
        raw: the chunk's bytes.
        group: the byte-group size of its elements (1: no grouping; see ``bytegroup_size``).
        config: the compression asked for.

    Returns:
        The stored bytes (a view of ``raw`` when stored as is), their chain and CRC32.
    """
    view = tensor_memoryview(raw)
    if config.compression is None:
        return EncodedChunk(view, [], crc.crc32(view, 0))
    compressor = registry.compressor(config.compression)
    if config.compression == "zstd" and group in planes.SIZES and planes.LITTLE_ENDIAN:
        stored, spec = planes.PLANES.encode_planes(raw.numpy(), group, planes.ROTATE, config.level)
        if stored.size >= len(view):
            return EncodedChunk(view, [], crc.crc32(view, 0))
        stored_view = stored.data  # the array's own memoryview: no copy
        return EncodedChunk(stored_view, [spec], crc.crc32(stored_view, 0))
    codecs: list[dict] = []
    data = raw
    if group > 1:
        spec = BYTEGROUP.spec_for(group)
        data = BYTEGROUP.encode(raw, spec)
        codecs.append(spec)
    spec = compressor.spec(config.level)
    compressed = compressor.encode(tensor_memoryview(data), spec, reordered=bool(codecs))  # keeps ``data`` alive
    codecs.append(spec)
    if len(compressed) >= len(view):
        return EncodedChunk(view, [], crc.crc32(view, 0))
    return EncodedChunk(compressed, codecs, crc.crc32(compressed, 0))


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
    whole chunk: a compressor with no reorder step before it decompresses straight into it, and raw
    bytes are read straight into it. Otherwise the decoded bytes go to ``emit`` piece by piece
    (nowhere, for a verify). Memory beyond the destination is a few pieces and the decoder's own
    (zstd's window, held through its decode budget).

    Every stored byte is read and checksummed even when decoding fails early, so damage is reported
    as a checksum mismatch; a decoder error is reported when the checksum matches (a hostile chunk).

    Args:
        source: the stored bytes.
        codecs: the chunk's chain, as the (validated) manifest records it.
        crc32: the CRC32 of the stored bytes the manifest records.
        raw_length: the decoded length.
        direct: where to decode to, when one tensor holds the whole chunk.
        emit: where decoded bytes go otherwise (``emit(first, stride, data)``).

    Raises:
        CheckpointDamagedError: a checksum mismatch, a chain the format does not define, or stored
            bytes that do not decode to exactly ``raw_length`` bytes.
    """
    what = source.what
    error: CheckpointDamagedError | None = None
    try:
        try:
            chain = registry.resolve(codecs)
        except registry.ChainError:
            ids = [codec.get("id") for codec in codecs]
            raise CheckpointDamagedError(f"codec chain {ids} in {what} is not one this format defines") from None
        if chain.compress is None:
            if source.length != raw_length:
                raise CheckpointDamagedError(f"{what} holds {source.length} bytes, expected {raw_length}")
            _copy_raw(source, raw_length, direct, emit)
        else:
            for codec, spec in chain.reorders:  # each wraps the next: the stream arrives in the last one's order
                emit = codec.decode_emit(emit, raw_length, spec)
            compressor, spec = chain.compress
            compressor.decode(source, raw_length, spec, None if chain.reorders else direct, emit)
    except CheckpointDamagedError as exc:
        error = exc
    source.drain()
    if source.crc != crc32:
        raise CheckpointDamagedError(
            f"checksum mismatch in {what}: stored CRC32 {crc32:08x}, computed {source.crc:08x}"
        ) from None
    check = source.frame_check
    if check is not None and check.has_trailing_bytes(source.length):
        check.check(source.length, what)  # trailing bytes: say so, whatever the decoder made of them
    if error is not None:
        raise error
    if check is not None:
        check.check(source.length, what)


def _copy_raw(source: ChunkSource, raw_length: int, direct: torch.Tensor | None, emit: Emit | None) -> None:
    """The empty chain: the stored bytes are the chunk's bytes."""
    if direct is not None:
        view = tensor_memoryview(direct)
        for start in range(0, raw_length, READ_PIECE):
            source.readinto(view[start : start + READ_PIECE])
        return
    piece, view = piece_buffer(raw_length)
    pos = 0
    while pos < raw_length:
        n = source.readinto(view)
        if emit is not None:
            emit(pos, 1, piece[:n])
        pos += n


def decode(stored: bytes | memoryview, codecs: list[dict], crc32: int, out: torch.Tensor, what: str) -> None:
    """Verify and decode an in-memory stored chunk into ``out`` (uint8, exactly the raw length).

    Args:
        stored: the stored bytes.
        codecs: the chunk's chain.
        crc32: the CRC32 of the stored bytes.
        out: uint8 tensor of the decoded length.
        what: names the chunk in error messages.

    Raises:
        CheckpointDamagedError: as :func:`decode_chunk`.
    """
    decode_chunk(ChunkSource.of_bytes(stored, what), codecs, crc32, out.numel(), direct=out, emit=emit_into(out))
