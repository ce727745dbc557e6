"""The on-disk format: names, the manifest schema, and validation of untrusted manifests.

A checkpoint is a directory ``step-<12 digits>/`` holding ``manifest.json`` and ``data-NNNNN.bin``.
All tensors live in one logical byte space (the staging arena's layout: tensors grouped by dtype,
each 64-byte aligned). Chunks cut that space into contiguous, non-overlapping ranges; each chunk is
stored in a data file after its codec chain (applied in order, reversed on read) with a CRC32 of
the stored bytes. A tensor is found by its offset in the logical space, never by a file position,
so codecs may change chunk sizes on disk without touching the tensor index. That is version 1.
A checkpoint written by several ranks (version 2, the end of this module) has one data file and
one sealed rank table per rank, and a manifest naming every rank table by its seal.

docs/format.md specifies all of it as rules for writers and readers; a change here changes that page.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from asyncckpt.codec.registry import ChainError, check_chain
from asyncckpt.errors import CheckpointDamagedError
from asyncckpt.state import skeleton

FORMAT_NAME = "asyncckpt"
FORMAT_VERSION = 1
MULTI_RANK_VERSION = 2  # the manifest of a checkpoint written by several ranks, and its rank tables
MAX_WORLD_SIZE = 1 << 16
MANIFEST_NAME = "manifest.json"
ALIGNMENT = 64
MAX_STEP = 10**12 - 1
# A manifest is untrusted input parsed into Python objects (~100 bytes per counted value at worst),
# so its size and its number of JSON values (counted before parsing) are capped: parsing the largest
# one allowed costs at most ~200 MiB and a few seconds. The writer refuses to commit a manifest over
# either cap (``Manifest.to_json``). 2M values is the manifest of ~140k chunks (a ~570 GB checkpoint
# at the default 4 MiB chunk size), of ~180k tensors, or of a model of ~40k parameter tensors with
# its AdamW state (~48 values per parameter: the parameter and 3 state tensors).
MAX_MANIFEST_BYTES = 64 << 20
MAX_MANIFEST_VALUES = 2_000_000
MAX_CHUNK_RAW = 1 << 30
MAX_TREE_DEPTH = skeleton.MAX_TREE_DEPTH  # levels of nesting in a state (the skeleton checks it)

_STEP_DIR = re.compile(r"step-([0-9]{12})")
# ``data-NNNNN.bin``; ``data-NNNNN-<16 hex>.bin`` where a save attempt's data names are its own
# (the manifest-written-last commit, storage/commit.py).
_DATA_FILE = re.compile(r"data-([0-9]{5})(?:-[0-9a-f]{16})?\.bin")
# The manifest-written-last commit keeps versions of a step's manifest side by side, the highest
# generation that verifies being the step's; ``manifest.json`` counts as generation 0.
_MANIFEST_GENERATION = re.compile(r"manifest-([0-9]{12})\.json")
# A multi-rank checkpoint's rank tables: ``rank-NNNNN.json``, or with the attempt's 16 hex digits.
_RANK_FILE = re.compile(r"rank-([0-9]{5})(?:-([0-9a-f]{16}))?\.json")

_DTYPE_NAMES = (
    "float64 float32 float16 bfloat16 complex128 complex64 complex32 "
    "int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool "
    "float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2"
).split()
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _DTYPE_NAMES if isinstance(getattr(torch, name, None), torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(f"dtype {dtype} is not supported by the checkpoint format")
    return name


def step_dir_name(step: int) -> str:
    return f"step-{step:012d}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def data_file_name(rank: int, attempt: str | None = None) -> str:
    """The name of a checkpoint's data file ``rank``.

    Args:
        rank: The file's number (0 for a single-writer checkpoint).
        attempt: 16 lowercase hex digits unique to one save attempt, for a commit that writes a
            step's data beside an older version of it (manifest written last); None otherwise.

    Returns:
        ``data-NNNNN.bin``, or ``data-NNNNN-<attempt>.bin``.
    """
    return f"data-{rank:05d}.bin" if attempt is None else f"data-{rank:05d}-{attempt}.bin"


def rank_file_name(rank: int, attempt: str | None = None) -> str:
    """The name of rank ``rank``'s table (its tree, tensors, chunks and pieces) in a multi-rank checkpoint.

    Args:
        rank: The rank.
        attempt: As for :func:`data_file_name`.

    Returns:
        ``rank-NNNNN.json``, or ``rank-NNNNN-<attempt>.json``.
    """
    return f"rank-{rank:05d}.json" if attempt is None else f"rank-{rank:05d}-{attempt}.json"


def is_rank_file_name(name: str) -> bool:
    """Whether ``name`` is a rank table's name (``rank-NNNNN.json``, ``rank-NNNNN-<16 hex>.json``)."""
    return _RANK_FILE.fullmatch(name) is not None


def is_data_file_name(name: str) -> bool:
    """Whether ``name`` is a data file name a manifest may reference (nothing with a path in it).

    Args:
        name: A file name.

    Returns:
        True for ``data-NNNNN.bin`` and ``data-NNNNN-<16 hex>.bin``.
    """
    return _DATA_FILE.fullmatch(name) is not None


def data_file_rank(name: str) -> int:
    """The number of a data file (``data-NNNNN...bin``), the inverse of :func:`data_file_name`.

    Args:
        name: A name :func:`is_data_file_name` accepts.

    Returns:
        NNNNN.

    Raises:
        ValueError: ``name`` is no data file name.
    """
    match = _DATA_FILE.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is no data file name")
    return int(match.group(1))


def manifest_generation_name(generation: int) -> str:
    """The name of generation ``generation`` (>= 1) of a step's manifest (manifest written last).

    Args:
        generation: The version number, one more than the step's highest so far.

    Returns:
        ``manifest-<12 digits>.json``.
    """
    return f"manifest-{generation:012d}.json"


def parse_manifest_generation(name: str) -> int | None:
    """The generation of a manifest file name: 0 for ``manifest.json``, None for any other name.

    Args:
        name: A file name in a step directory.

    Returns:
        The generation, or None when ``name`` is no manifest.
    """
    if name == MANIFEST_NAME:
        return 0
    match = _MANIFEST_GENERATION.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class TensorEntry:
    """One unique tensor: where its bytes sit in the logical byte space."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        """The entry as the manifest holds it (``dataclasses.asdict`` costs ~20 us an entry, a
        manifest of thousands of entries is written at every save)."""
        return {"dtype": self.dtype, "shape": self.shape, "offset": self.offset, "nbytes": self.nbytes}


@dataclass(frozen=True)
class ChunkEntry:
    """One stored chunk: the logical range it covers and where its stored bytes are."""

    file: str
    offset: int  # in the data file
    length: int  # stored bytes
    raw_offset: int  # in the logical byte space
    raw_length: int
    codecs: list[dict]
    crc32: int

    def to_dict(self) -> dict[str, Any]:
        """The entry as the manifest holds it (``dataclasses.asdict`` costs ~50 us a chunk: it
        copies the codec specs, which the JSON encoder only reads)."""
        return {
            "file": self.file,
            "offset": self.offset,
            "length": self.length,
            "raw_offset": self.raw_offset,
            "raw_length": self.raw_length,
            "codecs": self.codecs,
            "crc32": self.crc32,
        }


@dataclass
class Manifest:
    step: int
    created: float
    tree: dict
    tensors: list[TensorEntry]
    chunks: list[ChunkEntry]
    raw_bytes: int
    stored_bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        # built by hand: dataclasses.asdict would recurse into the (already plain) tree
        body = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "step": self.step, "created": self.created}
        body |= self._content()
        body |= {"metrics": self.metrics, "metadata": self.metadata, "tags": self.tags}
        return _sealed_within_limits(body, self.step)

    def _content(self) -> dict[str, Any]:
        """The tree, the tensor table and the chunk table, as the JSON holds them."""
        return {
            "tree": self.tree,
            "tensors": [t.to_dict() for t in self.tensors],
            "chunks": [c.to_dict() for c in self.chunks],
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
        }

    def data_files(self) -> set[str]:
        """The files of the step directory this manifest needs."""
        return {c.file for c in self.chunks}


_SEAL = re.compile(rb',"crc32":([0-9]{1,10})\}$')


def seal_manifest(body: bytes) -> bytes:
    """Append the manifest's own CRC32 as its last key: ``{...,"crc32":N}``.

    N is the CRC32 of the bytes of the object without that key (``{...}``), so it is checked on
    the exact bytes on disk, with no re-serialisation. Chunk CRCs cover the data; this covers the
    manifest, where one flipped digit could otherwise point a tensor at another one's bytes.
    """
    if not body.endswith(b"}") or body == b"{}":
        raise ValueError("seal_manifest needs a non-empty JSON object")
    return body[:-1] + b',"crc32":' + str(zlib.crc32(body)).encode() + b"}"


def ends_with_seal(raw: bytes) -> bool:
    """Whether ``raw`` ends with a manifest seal, verified or not: it was written to its end.

    A manifest cut short while it was written (a crash) has none; one that was written whole and
    damaged later keeps it unless the damage hit its last bytes.

    Args:
        raw: A manifest's bytes.

    Returns:
        True when the seal is there.
    """
    return _SEAL.search(raw) is not None


def check_manifest_seal(raw: bytes, where: str) -> None:
    match = _SEAL.search(raw)
    if match is None:
        raise _fail(where, "no manifest checksum at its end (truncated or damaged)")
    actual = zlib.crc32(b"}", zlib.crc32(memoryview(raw)[: match.start()]))  # no copy of a large manifest
    if actual != int(match.group(1)):
        raise _fail(where, f"manifest checksum mismatch: stored {int(match.group(1)):08x}, computed {actual:08x}")


def _fail(where: str, what: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(f"invalid manifest ({where}): {what}")


class ManifestTooLargeError(CheckpointDamagedError):
    """A manifest over the reader's limits: refused unparsed (a hostile or foreign manifest; this
    library never commits one). Readers of a root fall back from it as from damage."""


def manifest_over_limit(raw: bytes) -> tuple[str, str] | None:
    """Which of the reader's limits ``raw`` exceeds, as (what it holds, the limit), or None."""
    if len(raw) > MAX_MANIFEST_BYTES:
        return f"is {len(raw)} bytes", f"the reader's limit of {MAX_MANIFEST_BYTES} bytes"
    # every value but the first follows a comma or opens a container: an upper bound, counted at C speed
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if values > MAX_MANIFEST_VALUES:
        return f"holds up to {values} JSON values", f"the reader's limit of {MAX_MANIFEST_VALUES} JSON values"
    return None


def too_large(where: str, what: str, limit: str) -> ManifestTooLargeError:
    return ManifestTooLargeError(f"manifest {where} {what}: exceeds {limit}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _fail("json", f"duplicate key {key!r}")
        out[key] = value
    return out


def _int(value: Any, where: str, low: int = 0, high: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(where, f"expected an integer in [{low}, {high}], got {value!r}"[:200])
    return value


def _json_dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, "expected an object")
    return value


def parse_manifest(raw: bytes, where: str = "manifest.json") -> Manifest:
    """Parse and validate untrusted manifest bytes; every size, offset and name is checked."""
    body = _load_json(raw, where)
    if body.get("version") == MULTI_RANK_VERSION and "ranks" in body:
        return _parse_multi_rank(body, where)
    if body.get("version") != FORMAT_VERSION:
        raise _fail(where, f"format version {body.get('version')!r} is not supported (expected 1 or 2)")
    step = _int(body.get("step"), "step", 0, MAX_STEP)
    created = _created(body, lambda what: _fail("created", what))
    raw_bytes = _int(body.get("raw_bytes"), "raw_bytes")
    stored_bytes = _int(body.get("stored_bytes"), "stored_bytes")

    tensors = _parse_tensors(body.get("tensors"), raw_bytes)
    chunks = _parse_chunks(body.get("chunks"), raw_bytes)
    if sum(c.length for c in chunks) != stored_bytes:
        raise _fail("stored_bytes", "does not equal the sum of chunk lengths")
    tree = _json_dict(body.get("tree"), "tree")
    skeleton.validate(tree, [t.dtype for t in tensors], known_dtypes=DTYPES, error=_fail)
    return Manifest(
        step=step,
        created=created,
        tree=tree,
        tensors=tensors,
        chunks=chunks,
        raw_bytes=raw_bytes,
        stored_bytes=stored_bytes,
        **_annotations(body),
    )


def _created(body: dict, error: Callable[[str], Exception]) -> float:
    """A manifest's ``created``: seconds since the epoch, within (-10^12, 10^12)."""
    created = body.get("created")
    if not isinstance(created, (int, float)) or isinstance(created, bool) or not -1e12 < created < 1e12:
        raise error("expected a number (seconds since the epoch)")
    return float(created)


def _annotations(body: dict) -> dict[str, Any]:
    """A manifest's ``metrics``, ``metadata`` and ``tags``, checked (each optional)."""
    return {
        "metrics": _json_dict(body.get("metrics", {}), "metrics"),
        "metadata": _json_dict(body.get("metadata", {}), "metadata"),
        "tags": check_tags(body.get("tags", []), "tags", _fail),
    }


def check_tags(tags: Any, where: str, error=None) -> list[str]:
    """Tags are short printable strings; a list of at most 64 of them, without duplicates."""
    make = error or (lambda _where, what: ValueError(f"{_where}: {what}"))
    if not isinstance(tags, (list, tuple)) or len(tags) > 64:
        raise make(where, "tags must be a list of at most 64 strings")
    for tag in tags:
        if not isinstance(tag, str) or not 0 < len(tag) <= 128 or not tag.isprintable():
            raise make(where, f"tag {str(tag)[:40]!r} must be a printable string of 1-128 characters")
    if len(set(tags)) != len(tags):
        raise make(where, "duplicate tags")
    return list(tags)


def _parse_tensors(items: Any, raw_bytes: int) -> list[TensorEntry]:
    if not isinstance(items, list):
        raise _fail("tensors", "expected a list")
    out = []
    for i, item in enumerate(items):
        where = f"tensors[{i}]"
        item = _json_dict(item, where)
        dtype = item.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _fail(where, f"unknown dtype {dtype!r}"[:200])
        shape = item.get("shape")
        if not isinstance(shape, list) or len(shape) > 64:
            raise _fail(where, "shape must be a list of at most 64 dimensions")
        dims = tuple(_int(d, f"{where}.shape", 0, 1 << 48) for d in shape)
        nbytes = _int(item.get("nbytes"), f"{where}.nbytes", 0, raw_bytes)
        itemsize = DTYPES[dtype].itemsize
        if math.prod(dims) * itemsize != nbytes:
            raise _fail(where, f"shape {list(dims)} of {dtype} does not take {nbytes} bytes")
        offset = _int(item.get("offset"), f"{where}.offset", 0, raw_bytes)
        if offset % ALIGNMENT or offset + nbytes > raw_bytes:
            raise _fail(where, f"offset {offset} is unaligned or runs past the data")
        out.append(TensorEntry(dtype, dims, offset, nbytes))
    # Tensors never share bytes (tied tensors are stored once), so a reader allocates at most
    # raw_bytes in all, whatever a hostile manifest says.
    # Padding is only ever alignment (< 64 bytes per tensor), so the bytes a reader decodes are
    # bounded by the tensors the manifest declares, not by a raw_bytes figure it made up.
    previous_end = 0
    for entry in sorted((t for t in out if t.nbytes), key=lambda t: t.offset):
        if entry.offset < previous_end:
            raise _fail("tensors", f"tensor at offset {entry.offset} overlaps the one before it")
        if entry.offset - previous_end >= ALIGNMENT:
            raise _fail("tensors", f"a gap of {entry.offset - previous_end} bytes before offset {entry.offset}")
        previous_end = entry.offset + entry.nbytes
    if raw_bytes - previous_end >= ALIGNMENT:
        raise _fail("raw_bytes", f"{raw_bytes} is more than the tensors' {previous_end} bytes plus alignment")
    return out


def _parse_chunks(items: Any, raw_bytes: int) -> list[ChunkEntry]:
    if not isinstance(items, list):
        raise _fail("chunks", "expected a list")
    out = []
    expected_raw = 0
    file_ends: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"chunks[{i}]"
        item = _json_dict(item, where)
        name = item.get("file")
        if not isinstance(name, str) or not _DATA_FILE.fullmatch(name):
            raise _fail(
                where, f"data file name {name!r} is not of the form data-NNNNN.bin or data-NNNNN-<hex>.bin"[:200]
            )
        offset = _int(item.get("offset"), f"{where}.offset")
        length = _int(item.get("length"), f"{where}.length", 0, MAX_CHUNK_RAW * 2)
        if offset < file_ends.get(name, 0):
            raise _fail(where, "overlaps the previous chunk in its data file")
        file_ends[name] = offset + length
        raw_offset = _int(item.get("raw_offset"), f"{where}.raw_offset")
        raw_length = _int(item.get("raw_length"), f"{where}.raw_length", 1, MAX_CHUNK_RAW)
        if raw_offset != expected_raw:
            raise _fail(where, f"raw range starts at {raw_offset}, expected {expected_raw}")
        expected_raw = raw_offset + raw_length
        if expected_raw > raw_bytes:
            raise _fail(where, "raw range runs past raw_bytes")
        codecs: Any = item.get("codecs")  # a list of objects once check_chain passes
        try:  # each codec, looked up by name in the registry, checks its own parameters
            check_chain(codecs, raw_length, length)
        except ChainError as exc:
            raise _fail(where + exc.field, str(exc)) from None
        crc = _int(item.get("crc32"), f"{where}.crc32", 0, 0xFFFFFFFF)
        out.append(ChunkEntry(name, offset, length, raw_offset, raw_length, codecs, crc))
    if expected_raw != raw_bytes:
        raise _fail("chunks", f"cover {expected_raw} raw bytes, expected {raw_bytes}")
    return out


# ------------------------------------------------------------------------------------ multi-rank
#
# A checkpoint written by several ranks (docs/format.md, section 11): each rank writes its data file
# ``data-RRRRR.bin`` and its rank table ``rank-RRRRR.json`` (a version-1 manifest body of its own
# tensors and chunks, plus the pieces of global tensors it stored), and rank 0 writes the manifest
# (version 2) that names every rank table with its seal: the commit record. Global tensors (sharded
# or replicated ones) are leaves ``{"G": i}`` of the rank tables' trees, stored as pieces (a box of
# the global tensor) across the ranks.


@dataclass(frozen=True)
class GlobalEntry:
    """A tensor of the whole job (a DTensor, or a tensor replicated over the ranks): its dtype and
    global shape; its bytes are pieces in the rank tables."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class PieceEntry:
    """A box of global tensor ``index`` stored as tensor ``tensor`` of a rank table; its shape is
    that tensor's, its place in the global tensor ``offsets``."""

    index: int
    tensor: int
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class RankEntry:
    """One rank's part of a multi-rank checkpoint, as the manifest names it."""

    file: str  # the rank table
    data: str  # its data file
    crc32: int  # the rank table's seal
    stored_bytes: int


@dataclass
class RankTable(Manifest):
    """What one rank wrote: its tree (global tensors as ``G`` leaves), its tensors and chunks (one
    data file), and which of its tensors are pieces of which global tensor."""

    rank: int = 0
    world_size: int = 1
    pieces: list[PieceEntry] = field(default_factory=list)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT_NAME,
            "version": MULTI_RANK_VERSION,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
        }
        body |= self._content()
        body["pieces"] = [[p.index, p.tensor, list(p.offsets)] for p in self.pieces]
        return _sealed_within_limits(body, self.step)


@dataclass
class MultiRankManifest(Manifest):
    """The manifest of a multi-rank checkpoint (version 2).

    Parsed from its own bytes it holds the global tensor table and the rank entries (``tables`` is
    None, ``tree`` empty). Read with its rank tables (``reader.read_manifest``) it is also a
    consolidated view a version-1 reader walks as usual: the tree is rank 0's with each ``G`` leaf
    made a ``T`` leaf of index ``local_count + i``; the tensors are rank 0's own ones followed by one
    entry per global tensor (at offsets of a virtual byte space: such entries are read by assembling
    pieces, never by offset); the chunks are every rank's, for counting and verifying.
    """

    world_size: int = 1
    globals: list[GlobalEntry] = field(default_factory=list)
    ranks: list[RankEntry] = field(default_factory=list)
    tables: list[RankTable] | None = None
    local_count: int = 0
    # global index -> its pieces, built at the first pieces_of (a reader asks for every global)
    _by_index: dict[int, list[tuple[int, PieceEntry]]] | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT_NAME,
            "version": MULTI_RANK_VERSION,
            "step": self.step,
            "created": self.created,
            "world_size": self.world_size,
            "globals": [[g.dtype, list(g.shape)] for g in self.globals],
            "ranks": [asdict(r) for r in self.ranks],
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "metrics": self.metrics,
            "metadata": self.metadata,
            "tags": self.tags,
        }
        return _sealed_within_limits(body, self.step)

    def data_files(self) -> set[str]:
        return {r.file for r in self.ranks} | {r.data for r in self.ranks}

    def pieces_of(self, index: int) -> list[tuple[int, PieceEntry]]:
        """Every stored piece of global tensor ``index``, as (rank, piece)."""
        assert self.tables is not None, "the rank tables are not read"
        if self._by_index is None:
            self._by_index = {}
            for table in self.tables:
                for piece in table.pieces:
                    self._by_index.setdefault(piece.index, []).append((table.rank, piece))
        return self._by_index.get(index, [])


def _sealed_within_limits(body: dict, step: int) -> bytes:
    raw = seal_manifest(json.dumps(body, separators=(",", ":")).encode())
    over = manifest_over_limit(raw)
    if over is not None:  # a checkpoint no reader would accept must never commit
        raise ValueError(
            f"the manifest of step {step} {over[0]}, over {over[1]}: a reader would refuse it. "
            "Store big lists of numbers as a tensor (torch.tensor(values)) and big text or "
            "metadata in a file of its own; many tiny tensors can be stacked into a few larger ones"
        )
    return raw


def seal_of(raw: bytes) -> int:
    """The CRC32 a sealed manifest or rank table stores as its seal (after ``check_manifest_seal``)."""
    match = _SEAL.search(raw)
    assert match is not None, "unsealed"
    return int(match.group(1))


def _load_json(raw: bytes, where: str) -> dict:
    """The JSON object of an untrusted manifest or rank table, refused over the reader's limits, with
    a key twice, or of another format."""
    over = manifest_over_limit(raw)
    if over is not None:
        raise too_large(where, *over)
    try:
        body = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointDamagedError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(where, f"not valid JSON: {exc}"[:300]) from None
    body = _json_dict(body, where)
    if body.get("format") != FORMAT_NAME:
        raise _fail(where, f"format is {body.get('format')!r}, expected {FORMAT_NAME!r}")
    return body


def _parse_multi_rank(body: dict, where: str) -> MultiRankManifest:
    step = _int(body.get("step"), f"{where}: step", 0, MAX_STEP)
    created = _created(body, lambda what: _fail(where, f"created: {what}"))
    world = _int(body.get("world_size"), f"{where}: world_size", 1, MAX_WORLD_SIZE)
    items = body.get("globals")
    if not isinstance(items, list):
        raise _fail(where, "globals: expected a list")
    globals_: list[GlobalEntry] = []
    for i, item in enumerate(items):
        at = f"{where}: globals[{i}]"
        if not isinstance(item, list) or len(item) != 2 or item[0] not in DTYPES or not isinstance(item[1], list):
            raise _fail(at, "expected [dtype, shape] with a known dtype")
        if len(item[1]) > 64:
            raise _fail(at, "shape has more than 64 dimensions")
        globals_.append(GlobalEntry(item[0], tuple(_int(d, f"{at}.shape", 0, 1 << 48) for d in item[1])))
    ranks_raw = body.get("ranks")
    if not isinstance(ranks_raw, list) or len(ranks_raw) != world:
        raise _fail(where, f"ranks: expected a list of {world} entries (world_size)")
    ranks: list[RankEntry] = []
    for r, item in enumerate(ranks_raw):
        at = f"{where}: ranks[{r}]"
        item = _json_dict(item, at)
        file, data = item.get("file"), item.get("data")
        table = _RANK_FILE.fullmatch(file) if isinstance(file, str) else None
        data_match = _DATA_FILE.fullmatch(data) if isinstance(data, str) else None
        if table is None or int(table.group(1)) != r:
            raise _fail(at, f"rank table name {str(file)[:60]!r} is not rank-{r:05d}[-<hex>].json")
        if data_match is None or int(data_match.group(1)) != r:
            raise _fail(at, f"data file name {str(data)[:60]!r} is not data-{r:05d}[-<hex>].bin")
        crc = _int(item.get("crc32"), f"{at}.crc32", 0, 0xFFFFFFFF)
        ranks.append(RankEntry(str(file), str(data), crc, _int(item.get("stored_bytes"), f"{at}.stored_bytes")))
    stored = _int(body.get("stored_bytes"), f"{where}: stored_bytes")
    if stored != sum(r.stored_bytes for r in ranks):
        raise _fail(where, "stored_bytes does not equal the sum of the ranks'")
    return MultiRankManifest(
        step=step,
        created=created,
        tree={skeleton.Kind.DICT: []},
        tensors=[],
        chunks=[],
        raw_bytes=_int(body.get("raw_bytes"), f"{where}: raw_bytes"),
        stored_bytes=stored,
        **_annotations(body),
        world_size=world,
        globals=globals_,
        ranks=ranks,
    )


def parse_rank_table(raw: bytes, where: str, manifest: MultiRankManifest, rank: int) -> RankTable:
    """Parse and validate one untrusted rank table against the manifest that names it.

    Args:
        raw: Its bytes (seal already checked against the manifest's entry).
        where: Its location, for messages.
        manifest: The checkpoint's manifest.
        rank: The rank the manifest says wrote it.

    Returns:
        The table.

    Raises:
        CheckpointDamagedError: Anything malformed or inconsistent with the manifest.
    """
    try:
        return _parse_rank_table(_load_json(raw, where), where, manifest, rank)
    except CheckpointDamagedError as exc:
        if where in str(exc):
            raise
        # a field's own message names the field only: which of the ranks' tables is it in
        raise CheckpointDamagedError(f"{where}: {exc}") from None


def _parse_rank_table(body: dict, where: str, manifest: MultiRankManifest, rank: int) -> RankTable:
    if body.get("version") != MULTI_RANK_VERSION:
        raise _fail(where, f"rank table version {body.get('version')!r} is not {MULTI_RANK_VERSION}")
    if body.get("rank") != rank or body.get("world_size") != manifest.world_size or body.get("step") != manifest.step:
        raise _fail(where, f"is not the table of rank {rank} of {manifest.world_size} at step {manifest.step}")
    raw_bytes = _int(body.get("raw_bytes"), f"{where}: raw_bytes")
    tensors = _parse_tensors(body.get("tensors"), raw_bytes)
    chunks = _parse_chunks(body.get("chunks"), raw_bytes)
    data = manifest.ranks[rank].data
    if any(c.file != data for c in chunks):
        raise _fail(where, f"a chunk names a data file other than {data}")
    stored = _int(body.get("stored_bytes"), f"{where}: stored_bytes")
    if stored != sum(c.length for c in chunks) or stored != manifest.ranks[rank].stored_bytes:
        raise _fail(where, "stored_bytes does not equal its chunks' or the manifest's figure")
    tree = _json_dict(body.get("tree"), f"{where}: tree")
    skeleton.validate(
        tree, [t.dtype for t in tensors], known_dtypes=DTYPES, error=_fail, globals_count=len(manifest.globals)
    )
    pieces = _parse_pieces(body.get("pieces"), where, tensors, manifest.globals)
    return RankTable(
        step=manifest.step,
        created=manifest.created,
        tree=tree,
        tensors=tensors,
        chunks=chunks,
        raw_bytes=raw_bytes,
        stored_bytes=stored,
        rank=rank,
        world_size=manifest.world_size,
        pieces=pieces,
    )


def _parse_pieces(items: Any, where: str, tensors: list[TensorEntry], globals_: list[GlobalEntry]) -> list[PieceEntry]:
    if not isinstance(items, list):
        raise _fail(where, "pieces: expected a list")
    out = []
    used: set[int] = set()
    for n, item in enumerate(items):
        at = f"{where}: pieces[{n}]"
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[2], list):
            raise _fail(at, "expected [global index, tensor index, offsets]")
        index = _int(item[0], f"{at} global index", 0, len(globals_) - 1)
        tensor = _int(item[1], f"{at} tensor index", 0, len(tensors) - 1)
        if tensor in used:
            raise _fail(at, f"tensor {tensor} is a piece twice")
        used.add(tensor)
        entry, whole = tensors[tensor], globals_[index]
        offsets = tuple(_int(o, f"{at} offset", 0, 1 << 48) for o in item[2])
        if entry.dtype != whole.dtype or len(entry.shape) != len(whole.shape) or len(offsets) != len(whole.shape):
            raise _fail(
                at, f"a {entry.dtype}{list(entry.shape)} piece does not fit global {whole.dtype}{list(whole.shape)}"
            )
        if any(o + s > d for o, s, d in zip(offsets, entry.shape, whole.shape, strict=True)):
            raise _fail(at, f"piece at {list(offsets)} of shape {list(entry.shape)} runs out of {list(whole.shape)}")
        out.append(PieceEntry(index, tensor, offsets))
    return out


def check_coverage(manifest: MultiRankManifest) -> None:
    """Every global tensor is tiled exactly by its pieces: no two overlap, together they cover it.

    Raises:
        CheckpointDamagedError: A global tensor with overlapping pieces or an uncovered part.
    """
    assert manifest.tables is not None
    by_index: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for table in manifest.tables:
        for piece in table.pieces:
            shape = table.tensors[piece.tensor].shape
            if math.prod(shape):
                by_index.setdefault(piece.index, []).append((piece.offsets, shape))
    for index, whole in enumerate(manifest.globals):
        boxes = by_index.get(index, [])
        if sum(math.prod(s) for _, s in boxes) != math.prod(whole.shape):
            raise _fail(f"global tensor {index}", f"its pieces do not cover {whole.dtype}{list(whole.shape)} exactly")
        if len(boxes) < 2:
            continue
        # swept along the dimension the pieces are cut in most (dim 1 for tensor-parallel columns),
        # so a box is compared only with those starting before it ends there, not with every box
        sweep = max(range(len(whole.shape)), key=lambda d: len({off[d] for off, _ in boxes}))
        boxes.sort(key=lambda box: (box[0][sweep], box[0]))
        for i, (a_off, a_shape) in enumerate(boxes):
            for b_off, b_shape in boxes[i + 1 :]:
                if b_off[sweep] >= a_off[sweep] + a_shape[sweep]:
                    break
                if all(
                    bo < ao + as_ and ao < bo + bs
                    for ao, as_, bo, bs in zip(a_off, a_shape, b_off, b_shape, strict=True)
                ):
                    raise _fail(f"global tensor {index}", f"pieces at {list(a_off)} and {list(b_off)} overlap")


def rewrite_globals(tree: dict, first: int) -> dict:
    """A copy of a rank table's tree whose ``G`` leaves are ``T`` leaves of index ``first + i``."""
    out = json.loads(json.dumps(tree))
    leaves = [visit.node for visit in skeleton.walk(out, None) if visit.kind == skeleton.Kind.GLOBAL]
    for node in leaves:
        node[skeleton.Kind.TENSOR] = first + node.pop(skeleton.Kind.GLOBAL)
    return out


def consolidate(manifest: MultiRankManifest, tables: list[RankTable]) -> MultiRankManifest:
    """The consolidated view of a multi-rank checkpoint (see :class:`MultiRankManifest`).

    Args:
        manifest: The parsed manifest.
        tables: Every rank's table, validated, by rank.

    Returns:
        The manifest with ``tables``, ``tree``, ``tensors`` and ``chunks`` filled in.

    Raises:
        CheckpointDamagedError: A global tensor not tiled exactly by its pieces.
    """
    base = tables[0]
    view = MultiRankManifest(**{**manifest.__dict__, "tables": tables, "local_count": len(base.tensors)})
    check_coverage(view)
    at = -(-base.raw_bytes // ALIGNMENT) * ALIGNMENT
    tensors = list(base.tensors)
    for whole in manifest.globals:
        tensors.append(TensorEntry(whole.dtype, whole.shape, at, whole.nbytes))
        at += -(-whole.nbytes // ALIGNMENT) * ALIGNMENT
    view.tree = rewrite_globals(base.tree, len(base.tensors))
    view.tensors = tensors
    view.chunks = [c for table in tables for c in table.chunks]
    return view


def per_rank_differences(manifest: MultiRankManifest) -> list[str]:
    """The paths of the state that are per rank and may differ between ranks: per-rank tensors
    (never compared) and values or structure that differ between the rank tables' trees. Empty
    when the ranks stored nothing of their own but equal values: the checkpoint then loads at any
    world size without a choice of rank."""
    assert manifest.tables is not None
    seen: dict[str, set[str]] = {}
    for table in manifest.tables:
        for visit in skeleton.walk(table.tree):
            kind = visit.kind
            if kind == skeleton.Kind.GLOBAL:  # the same on every rank, but not where another has a value
                seen.setdefault(visit.path, set()).add("global")
                continue
            if kind in skeleton.CONTAINER_KINDS or kind == skeleton.Kind.OBJECT:
                if kind in skeleton.CONTAINER_KINDS:
                    keys = [k for k, _ in visit.node[kind]] if kind == skeleton.Kind.DICT else len(visit.node[kind])
                    seen.setdefault(visit.path, set()).add(f"{kind}:{keys!r}")
                continue
            if kind in skeleton.TENSOR_KINDS:
                seen.setdefault(visit.path, set()).update({"tensor", f"rank {table.rank}"})
            else:
                seen.setdefault(visit.path, set()).add(json.dumps(visit.node[kind]))
    return sorted(path for path, values in seen.items() if len(values) > 1)
