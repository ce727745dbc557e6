"""The codec registry: every codec a chunk's chain may name, looked up by that name.

A chunk's ``codecs`` list in the manifest is its chain, applied in order on write and reversed on
read (zarr's codec chains are the model). Each entry is ``{"id": name, **parameters}``; the codec
registered under ``name`` validates its own parameters (they come from an untrusted manifest) and
does its encode and decode steps. Codecs come in two roles:

- a *reorder* codec (``bytegroup``) rearranges a chunk's bytes without changing their number;
- a *compress* codec (``zstd``, ``planes``) turns them into a stream of stored bytes, and bounds
  its size.

A chain is empty (stored as is), or one compress codec, optionally after one reorder codec: the
shapes the format defines. Adding a codec is its module plus one registration line in
``asyncckpt/codec/__init__.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from asyncckpt.codec.source import ChunkSource

# emit(first, stride, data): decoded bytes ``data[k]`` belong at chunk byte ``first + k * stride``
Emit = Callable[[int, int, torch.Tensor], None]


def emit_into(out: torch.Tensor) -> Emit:
    """An emitter that writes decoded bytes into ``out`` (uint8, the chunk's decoded length)."""

    def emit(first: int, stride: int, data: torch.Tensor) -> None:
        n = data.numel()
        out[first : first + (n - 1) * stride + 1 : stride].copy_(data)

    return emit


MAX_CHAIN = 4  # codecs a manifest's chain may list before any is looked at


class ChainError(ValueError):
    """A codec chain (or one codec's parameters) that the format does not define.

    Args:
        message: what is wrong, for a person.
        field: where in the chunk's entry, appended to the chunk's name (".codecs.size"); empty
            for the chunk as a whole.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def int_param(spec: Mapping[str, Any], key: str, low: int, high: int) -> int:
    """An integer parameter of a codec entry, checked to lie in ``[low, high]``.

    Args:
        spec: the codec's manifest entry.
        key: the parameter's name.
        low: the smallest value allowed.
        high: the largest value allowed.

    Returns:
        The value.

    Raises:
        ChainError: the value is not such an integer (a bool is not one).
    """
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ChainError(f"expected an integer in [{low}, {high}], got {value!r}"[:200], f".codecs.{key}")
    return value


class Codec(abc.ABC):
    """One step of a codec chain, registered under the name the manifest records (``name``)."""

    name: ClassVar[str]
    params: ClassVar[frozenset[str]]  # the keys of its manifest entry besides "id"
    optional: ClassVar[frozenset[str]] = frozenset()  # keys it may also hold

    @abc.abstractmethod
    def check_params(self, spec: Mapping[str, Any], raw_length: int) -> None:
        """Check the values of this codec's parameters in an untrusted manifest entry.

        The registry has already checked that ``spec`` holds every one of ``params`` besides
        "id", and nothing else but ``optional`` ones.

        Args:
            spec: the codec's manifest entry.
            raw_length: the decoded length of the chunk it applies to.

        Raises:
            ChainError: a parameter this codec cannot decode with, saying which and why.
        """


class ReorderCodec(Codec):
    """Rearranges a chunk's bytes, keeping their number (byte-grouping)."""

    @abc.abstractmethod
    def encode(self, raw: torch.Tensor, spec: Mapping[str, Any]) -> torch.Tensor:
        """The bytes rearranged.

        Args:
            raw: contiguous uint8 CPU tensor of the chunk's bytes.
            spec: the codec's manifest entry (its parameters).

        Returns:
            A contiguous uint8 CPU tensor of as many bytes.
        """

    @abc.abstractmethod
    def decode_emit(self, emit: Emit | None, raw_length: int, spec: Mapping[str, Any]) -> Emit | None:
        """An emitter of rearranged bytes that puts them where ``emit`` wants the original ones.

        Args:
            emit: receives decoded bytes at their positions in the chunk before this codec ran
                (None: a verify, nothing receives them).
            raw_length: the chunk's decoded length.
            spec: the codec's manifest entry (its parameters).

        Returns:
            An emitter for the rearranged stream, fed contiguous pieces (stride 1) in order; None
            when ``emit`` is None.
        """


class CompressCodec(Codec):
    """Turns a chunk's bytes into stored bytes and back, streaming, in bounded memory."""

    # a user can ask for it by name (CodecConfig.compression); False for one a writer picks by
    # itself (``planes``, what "zstd" writes for floats)
    selectable: ClassVar[bool] = True
    # the format defines it after a reorder codec too ([bytegroup, zstd]); False: only alone ([planes])
    after_reorder: ClassVar[bool] = True

    @abc.abstractmethod
    def spec(self, level: int) -> dict[str, Any]:
        """The manifest entry a writer records for ``level`` (``CodecConfig.level``).

        Args:
            level: the compression level asked for.

        Returns:
            The entry, ``{"id": name, ...}``.

        Raises:
            ValueError: a level this codec does not write with.
        """

    def check_stored(self, spec: Mapping[str, Any], length: int) -> None:
        """Check a chunk's stored length against this codec's entry, where the entry says more
        than :meth:`bound` (``planes`` records each part's length). Nothing by default.

        Raises:
            ChainError: they disagree.
        """

    @abc.abstractmethod
    def bound(self, raw_length: int) -> int:
        """The most stored bytes this codec ever makes of ``raw_length`` bytes.

        Args:
            raw_length: the decoded length.

        Returns:
            The bound, which a reader enforces before reading a chunk.
        """

    @abc.abstractmethod
    def encode(self, data: memoryview, spec: Mapping[str, Any], *, reordered: bool) -> bytes:
        """The stored bytes of ``data``.

        Args:
            data: the bytes to compress.
            spec: the codec's manifest entry (its parameters).
            reordered: a reorder codec ran before (the bytes are byte planes), which a codec
                may tune for.

        Returns:
            The stored bytes.
        """

    @abc.abstractmethod
    def decode(
        self,
        source: ChunkSource,
        raw_length: int,
        spec: Mapping[str, Any],
        direct: torch.Tensor | None,
        emit: Emit | None,
    ) -> None:
        """Decode the stored bytes of ``source`` into ``direct`` or through ``emit``.

        Args:
            source: the stored bytes; read through it only (it checksums them).
            raw_length: the decoded length the manifest declares.
            spec: the codec's manifest entry (its parameters).
            direct: uint8 tensor of exactly ``raw_length`` to decode into, or None.
            emit: used when ``direct`` is None: receives contiguous pieces (stride 1) in order
                (None: a verify, the decoded bytes go nowhere).

        Raises:
            CheckpointDamagedError: the stored bytes do not decode to exactly ``raw_length`` bytes.
        """


_CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Make ``codec`` known under its name (once per name).

    Args:
        codec: the codec.

    Returns:
        The codec.

    Raises:
        ValueError: another codec has that name.
    """
    if codec.name in _CODECS:
        raise ValueError(f"a codec named {codec.name!r} is already registered")
    _CODECS[codec.name] = codec
    return codec


def get(name: str) -> Codec:
    """The codec registered as ``name``.

    Raises:
        KeyError: none is.
    """
    return _CODECS[name]


def compressor(name: str) -> CompressCodec:
    """The compress codec registered as ``name``.

    Raises:
        ValueError: no compress codec has that name.
    """
    codec = _CODECS.get(name)
    if not isinstance(codec, CompressCodec) or not codec.selectable:
        raise ValueError(f"compression must be one of {compressor_names()} or None, got {name!r}")
    return codec


def compressor_names() -> list[str]:
    """The names of every compress codec a user can ask for, sorted."""
    return sorted(name for name, c in _CODECS.items() if isinstance(c, CompressCodec) and c.selectable)


@dataclass(frozen=True)
class Chain:
    """A codec chain looked up: its reorder steps in order, then its compress step (or none)."""

    reorders: list[tuple[ReorderCodec, Mapping[str, Any]]]
    compress: tuple[CompressCodec, Mapping[str, Any]] | None


def resolve(specs: Sequence[Mapping[str, Any]]) -> Chain:
    """Look up the codecs of a chain by name and check its shape (not the parameters' values).

    Args:
        specs: the chunk's ``codecs`` entries.

    Returns:
        The chain.

    Raises:
        ChainError: an unknown name, or a shape the format does not define.
    """
    ids = [spec.get("id") for spec in specs]
    codecs = [_CODECS.get(i) if isinstance(i, str) else None for i in ids]
    if not codecs:
        return Chain([], None)
    *reorders, last = codecs
    if (
        not isinstance(last, CompressCodec)
        or len(reorders) > 1
        or not all(isinstance(c, ReorderCodec) for c in reorders)
        or (reorders and not last.after_reorder)
    ):
        raise ChainError(f"codec chain {ids} is not one this format defines"[:200])
    steps = [(c, spec) for c, spec in zip(reorders, specs, strict=False)]
    return Chain(steps, (last, specs[-1]))  # type: ignore[arg-type]  # checked just above


def check_chain(specs: Any, raw_length: int, length: int) -> Chain:
    """Validate a chunk's codec chain from an untrusted manifest, as a reader needs it.

    Each codec is looked up by name and checks its own parameters; then the chain's shape, and the
    stored length against what the chain can make of ``raw_length`` bytes.

    Args:
        specs: the chunk's ``codecs`` value, as parsed from JSON.
        raw_length: the chunk's decoded length.
        length: the chunk's stored length.

    Returns:
        The chain.

    Raises:
        ChainError: the first problem found, with the part of the entry it concerns.
    """
    if not isinstance(specs, list) or len(specs) > MAX_CHAIN:
        raise ChainError(f"codecs must be a list of at most {MAX_CHAIN} codecs")
    for spec in specs:
        if not isinstance(spec, dict):
            raise ChainError("expected an object", ".codecs")
        name = spec.get("id")
        codec = _CODECS.get(name) if isinstance(name, str) else None
        if codec is None:
            raise ChainError(f"unknown codec {spec!r}"[:200])
        keys = set(spec) - {"id"}
        if not codec.params <= keys <= codec.params | codec.optional:
            optional = f" (and optionally {sorted(codec.optional)})" if codec.optional else ""
            takes = f"{sorted(codec.params)}{optional}"
            raise ChainError(f"codec {codec.name!r} takes the parameters {takes}, got {sorted(map(str, keys))}"[:200])
        codec.check_params(spec, raw_length)
    chain = resolve(specs)
    if chain.compress is None and length != raw_length:
        raise ChainError("an uncompressed chunk must store exactly raw_length bytes")
    if chain.compress is not None and length > chain.compress[0].bound(raw_length):
        # what a reader reads (and checksums) is bounded by the tensors the manifest declares
        name = chain.compress[0].name
        raise ChainError(f"stores {length} bytes, more than a {name} frame of {raw_length} bytes ever takes")
    if chain.compress is not None:
        chain.compress[0].check_stored(chain.compress[1], length)
    return chain
