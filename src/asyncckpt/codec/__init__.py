"""Chunk codecs: the registry of codecs a manifest's chain may name, and the chain applied to a chunk.

Modules: ``registry`` (the Codec roles, lookup by name, chain validation), ``chain`` (encode and
decode one chunk through its chain, CRC32), ``source`` (a chunk's stored bytes read in bounded,
checksummed pieces), and one module per codec: ``bytegroup``, ``zstd``, ``planes``. A chunk stored as is has
an empty chain: no codec runs.
"""

from asyncckpt.codec import registry
from asyncckpt.codec.bytegroup import BYTEGROUP, bytegroup_size
from asyncckpt.codec.chain import CodecConfig, EncodedChunk, decode, decode_chunk, encode
from asyncckpt.codec.planes import PLANES, ZPLANES
from asyncckpt.codec.registry import Emit
from asyncckpt.codec.source import READ_PIECE, ChunkSource, tensor_memoryview
from asyncckpt.codec.zstd import DECODE_BUDGET, ZSTD, zstd_bound

# the codecs a chain may name: one line each
registry.register(BYTEGROUP)
registry.register(ZSTD)
registry.register(PLANES)
registry.register(ZPLANES)

__all__ = [
    "DECODE_BUDGET",
    "READ_PIECE",
    "ChunkSource",
    "CodecConfig",
    "Emit",
    "EncodedChunk",
    "bytegroup_size",
    "decode",
    "decode_chunk",
    "encode",
    "registry",
    "tensor_memoryview",
    "zstd_bound",
]
