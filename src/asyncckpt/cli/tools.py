"""The logic behind ``asyncckpt verify``, ``inspect``, ``diff``, ``export`` and ``prune`` (the CLI stays thin).

Long operations take ``progress``, a callable given each increment of bytes done; the terminal
drawing stays in the CLI.

Paths name leaves the way save errors do: ``state['model'].state_dict()['0.weight']``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import secrets
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import torch

from asyncckpt.engine.mirror import MIRROR_FILE
from asyncckpt.engine.reader import Where, read_checkpoint, read_manifest, verify_checkpoint, why_no_tier_verifies
from asyncckpt.errors import CheckpointError
from asyncckpt.format import MANIFEST_NAME, Manifest, MultiRankManifest, parse_step_dir, per_rank_differences
from asyncckpt.loading import open_target
from asyncckpt.metrics import METRICS_LOG
from asyncckpt.retention import (
    CheckpointInfo,
    RetentionPolicy,
    best_metric_missing,
    missing_metric_text,
    steps_to_delete,
    tagged_above,
)
from asyncckpt.state import skeleton
from asyncckpt.state.skeleton import TENSOR_KINDS, Kind
from asyncckpt.storage.backend import CheckpointRef, describe_file_kind, is_object_store_url
from asyncckpt.storage.catalog import Catalog
from asyncckpt.storage.commit import CommittedCheckpoint, open_storage, published_checkpoints
from asyncckpt.storage.local import LOCK_NAME, TEMP_PREFIX, fsync_dir

Progress = Callable[[int], None]  # called with each increment of bytes done

# how inspect and diff call each kind of leaf
_LEAF_KINDS = {
    Kind.TENSOR: "tensor",
    Kind.NDARRAY: "ndarray",
    Kind.NUMPY_SCALAR: "numpy scalar",
    Kind.VALUE: "value",
    Kind.DTYPE: "dtype",
    Kind.DEVICE: "device",
}


def resolve_checkpoint(path: str | os.PathLike) -> Where:
    """The checkpoint directory at ``path``, or a CheckpointError that says what ``path`` is instead."""
    if is_object_store_url(path):
        backend, single = open_target(path)
        if single is None:
            committed = published_checkpoints(backend)
            example = f", e.g. {committed[-1].ref} (the newest of {len(committed)})" if committed else ""
            raise CheckpointError(
                f"{os.fspath(path)} is a checkpoint root, not a checkpoint; name one of its checkpoints{example}"
            )
        return CheckpointRef(backend, single)
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir() and not path.is_symlink() and not (path / MANIFEST_NAME).exists():
        committed = Catalog.of_reader(path).checkpoints()
        if committed:
            raise CheckpointError(
                f"{path} is a checkpoint root, not a checkpoint; name one of its checkpoints, "
                f"e.g. {committed[-1].path} (the newest of {len(committed)})"
            )
        raise CheckpointError(f"{path} is not a checkpoint: it has no {MANIFEST_NAME}")
    return path


def resolve_root(path: str | os.PathLike) -> Path | str:
    if is_object_store_url(path):
        return os.fspath(path)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint root {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint root {path} is not a directory")
    if (path / MANIFEST_NAME).exists():
        raise CheckpointError(f"{path} is one checkpoint, not a checkpoint root; pass its parent {path.parent}")
    return path


def json_ready(value: Any) -> Any:
    """JSON has no NaN or infinity: such a float becomes the string "nan", "inf" or "-inf". Every
    command renders a metric or value this one way, in text and in ``--json``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# ----------------------------------------------------------------------------------------- leaves


@dataclass
class Leaf:
    path: str
    kind: str  # tensor, ndarray, numpy scalar, value, dtype, device, empty (an empty container)
    index: int | None = None  # tensor index in the manifest
    value: Any = None


def leaves(tree: dict, path: str = "state") -> list[Leaf]:
    """Every leaf of a manifest tree, as ``inspect`` and ``diff`` list them.

    Args:
        tree: a validated skeleton.
        path: the root's path.

    Returns:
        The leaves in order (tensors, values, dtypes, devices, empty containers), each with its path.
    """
    out: list[Leaf] = []
    for visit in skeleton.leaves(tree, path):
        if visit.kind == Kind.GLOBAL:  # a rank table's mark of a tensor of the consolidated view
            continue
        value = visit.node[visit.kind]
        if visit.kind in TENSOR_KINDS:
            out.append(Leaf(visit.path, _LEAF_KINDS[visit.kind], index=value))
        elif visit.kind in _LEAF_KINDS:
            shown = f"torch.{value}" if visit.kind == Kind.DTYPE else value
            out.append(Leaf(visit.path, _LEAF_KINDS[visit.kind], value=shown))
        else:
            out.append(Leaf(visit.path, "empty", value=skeleton.empty_text(visit.kind)))
    return out


# ---------------------------------------------------------------------------------------- inspect


def inspect_checkpoint(path: Where) -> dict:
    """A JSON-ready description of one checkpoint, from its manifest only (no tensor data is read)."""
    manifest = read_manifest(path)
    first_path: dict[int, str] = {}
    rows = []
    for leaf in leaves(manifest.tree):
        row: dict[str, Any] = {"path": leaf.path, "kind": leaf.kind}
        if leaf.index is not None:
            entry = manifest.tensors[leaf.index]
            row.update(dtype=entry.dtype, shape=list(entry.shape), bytes=entry.nbytes)
            if leaf.index in first_path:
                row["tied_to"] = first_path[leaf.index]
            else:
                first_path[leaf.index] = leaf.path
            if isinstance(manifest, MultiRankManifest):
                row.update(_stored_where(manifest, leaf.index))
        else:
            row["value"] = leaf.value
        rows.append(row)
    world_size, per_rank = 1, []
    if isinstance(manifest, MultiRankManifest):
        # the state each rank kept of its own (loading it whole needs per_rank=)
        world_size, per_rank = manifest.world_size, per_rank_differences(manifest)
    return {
        "path": str(path),
        "step": manifest.step,
        "world_size": world_size,
        "per_rank": per_rank,
        "created": manifest.created,
        "raw_bytes": manifest.raw_bytes,
        "stored_bytes": manifest.stored_bytes,
        "ratio": manifest.raw_bytes / manifest.stored_bytes if manifest.stored_bytes else None,
        "tensors": len(manifest.tensors),
        "chunks": len(manifest.chunks),
        "metrics": manifest.metrics,
        "metadata": manifest.metadata,
        "leaves": rows,
    }


def _stored_where(view: MultiRankManifest, index: int) -> dict[str, Any]:
    """Where a tensor of a multi-rank checkpoint's consolidated view is stored: rank 0's own (per
    rank), or pieces of a global tensor (shards or replicated row pieces) on some ranks."""
    if index < view.local_count:
        return {"stored": "per rank (rank 0's shown)"}
    pieces = [(rank, piece) for rank, piece in view.pieces_of(index - view.local_count)]
    ranks = sorted({rank for rank, _ in pieces})
    on = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
    return {"stored": f"{plural(len(pieces), 'piece')} on {on}", "pieces": len(pieces), "ranks": ranks}


def format_created(created: float) -> str:
    """A creation time as every command shows it: ISO 8601 UTC to the second, ``2026-11-30T06:00:00Z``."""
    try:
        when = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{created} s after the epoch"  # beyond the calendar datetime knows
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_inspect(info: dict) -> str:
    ratio = f"{info['ratio']:.3f}x" if info["ratio"] else "-"
    lines = [
        f"checkpoint  {info['path']}",
        f"step        {info['step']}",
        f"created     {format_created(info['created'])}",
        f"size        {info['raw_bytes']} bytes raw, {info['stored_bytes']} stored ({ratio}), "
        f"{plural(info['tensors'], 'tensor')} in {plural(info['chunks'], 'chunk')}",
        *(
            [
                f"world size  {info['world_size']} ranks; tensors shown whole (consolidated)",
                f"per rank    {', '.join(info['per_rank']) or 'nothing (every rank saved equal values)'}",
            ]
            if info.get("world_size", 1) > 1
            else []
        ),
        f"metrics     {json.dumps(json_ready(info['metrics']))}",
        f"metadata    {json.dumps(json_ready(info['metadata']))}",
        "tree",
    ]
    for row in info["leaves"]:
        if "dtype" in row:
            what = f"{row['kind']} {row['dtype']} {tuple(row['shape'])} {row['bytes']} bytes"
            if "tied_to" in row:
                what += f" (tied to {row['tied_to']})"
            if "stored" in row:
                what += f", {row['stored']}"
        elif row["kind"] == "value":
            what = repr(row["value"])
        elif row["kind"] == "empty":
            what = row["value"]
        else:
            what = f"{row['kind']} {row['value']}"
        lines.append(f"  {row['path']}: {what}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- diff


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _compare_tensors(a: torch.Tensor, b: torch.Tensor) -> dict:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return {
            "status": "dtype/shape changed",
            "a": {"dtype": str(a.dtype).removeprefix("torch."), "shape": list(a.shape)},
            "b": {"dtype": str(b.dtype).removeprefix("torch."), "shape": list(b.shape)},
        }
    # "equal" is bit for bit: a resume checked with diff must not pass on -0.0 against 0.0, or on
    # NaNs of other payloads (equal in value: then the row says so)
    identical = bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    numeric = a.is_floating_point() or a.is_complex()
    if numeric:
        try:
            wide = torch.complex128 if a.is_complex() else torch.float64
            x, y = a.to(wide), b.to(wide)
        except (RuntimeError, TypeError):
            numeric = False  # packed formats (float4) cannot be widened: compare bytes
    if not numeric:
        return {"status": "equal" if identical else "different"}
    if identical:
        return {"status": "equal", "max_abs_diff": 0.0, "max_rel_diff": 0.0}
    both_nan = torch.isnan(x) & torch.isnan(y)
    same = (x == y) | both_nan
    diff = torch.where(same, torch.zeros((), dtype=torch.float64), (x - y).abs().to(torch.float64))
    diff = torch.nan_to_num(diff, nan=math.inf, posinf=math.inf)  # inf - inf, or NaN against a number
    scale = torch.maximum(x.abs(), y.abs()).to(torch.float64)
    rel = torch.nan_to_num(diff / scale, nan=math.inf, posinf=math.inf)  # NaN or inf involved: inf
    rel = torch.where(same, torch.zeros((), dtype=torch.float64), rel)
    max_abs, max_rel = float(diff.max()), float(rel.max())
    row = {"status": "different", "max_abs_diff": _json_float(max_abs), "max_rel_diff": _json_float(max_rel)}
    if max_abs == 0:
        row["bits_only"] = True  # equal in value: signed zeros, or NaNs of other payloads
    return row


DIFF_BATCH_BYTES = 256 << 20  # diff holds about this many tensor bytes of each checkpoint at a time


def diff_total_bytes(path_a: Where, path_b: Where) -> int:
    """What ``diff_checkpoints``'s progress increments sum to: every tensor byte of both checkpoints
    (each is read, verified and compared once), from the manifests alone."""
    total = 0
    for part in _diff_parts(read_manifest(path_a), read_manifest(path_b)):
        for manifest in (part.a, part.b):
            total += sum(_nbytes(manifest, i) for i in _indexes(_kept_leaves(manifest, part.keep)))
    return total


@dataclass
class _DiffPart:
    """One comparison ``diff`` makes: the consolidated views' shared state, or one rank's own
    state (a multi-rank checkpoint's per-rank paths, each rank against the same rank)."""

    a: Manifest | None  # None: that side has no such rank
    b: Manifest | None
    keep: Callable[[str], bool]  # the leaf paths compared here
    label: str = ""  # after each path: " (rank k)"


def _per_rank_paths(manifest: Manifest) -> set[str]:
    return set(per_rank_differences(manifest)) if isinstance(manifest, MultiRankManifest) else set()


def _rank_table(manifest: Manifest, rank: int) -> Manifest | None:
    if isinstance(manifest, MultiRankManifest):
        assert manifest.tables is not None
        return manifest.tables[rank] if rank < len(manifest.tables) else None
    return manifest if rank == 0 else None


def _diff_parts(manifest_a: Manifest, manifest_b: Manifest) -> list[_DiffPart]:
    """What ``diff`` compares: the whole trees; for a multi-rank checkpoint, the state each rank
    kept of its own is compared rank by rank (the consolidated view holds rank 0's alone, so a
    change on another rank would pass as equal)."""
    per_rank = _per_rank_paths(manifest_a) | _per_rank_paths(manifest_b)
    if not per_rank:
        return [_DiffPart(manifest_a, manifest_b, lambda path: True)]
    parts = [_DiffPart(manifest_a, manifest_b, lambda path: path not in per_rank)]
    ranks = max(getattr(m, "world_size", 1) for m in (manifest_a, manifest_b))
    for rank in range(ranks):
        table_a, table_b = _rank_table(manifest_a, rank), _rank_table(manifest_b, rank)
        parts.append(_DiffPart(table_a, table_b, lambda path: path in per_rank, f" (rank {rank})"))
    return parts


_CONTAINER_NAMES = {Kind.DICT: "dict", Kind.LIST: "list", Kind.TUPLE: "tuple"}


def _kept_containers(manifest: Manifest | None, keep: Callable[[str], bool]) -> dict[str, str]:
    """Each non-empty container's kind by path: a tuple, a list and a dict of int keys spell their
    items' paths alike (``[0]``), so equal leaves alone do not make equal checkpoints."""
    if manifest is None:
        return {}
    return {
        visit.path: _CONTAINER_NAMES[visit.kind]
        for visit in skeleton.walk(manifest.tree)
        if visit.kind in _CONTAINER_NAMES and visit.node[visit.kind] and keep(visit.path)
    }


def _kept_leaves(manifest: Manifest | None, keep: Callable[[str], bool]) -> dict[str, Leaf]:
    if manifest is None:
        return {}
    return {leaf.path: leaf for leaf in leaves(manifest.tree) if keep(leaf.path)}


def _batches(pairs: list[tuple[int | None, int | None]], manifest_a: Manifest | None, manifest_b: Manifest | None):
    """Consecutive runs of (A index, B index) pairs holding about DIFF_BATCH_BYTES of either side."""
    batch: list[tuple[int | None, int | None]] = []
    size_a = size_b = 0
    for ia, ib in pairs:
        batch.append((ia, ib))
        size_a += _nbytes(manifest_a, ia) if ia is not None else 0
        size_b += _nbytes(manifest_b, ib) if ib is not None else 0
        if max(size_a, size_b) >= DIFF_BATCH_BYTES:
            yield batch
            batch, size_a, size_b = [], 0, 0
    if batch:
        yield batch


def _read_some(path: Where, manifest: Manifest | None, wanted: set[int]) -> list[torch.Tensor | None]:
    if not wanted or manifest is None:
        return [None] * (0 if manifest is None else len(manifest.tensors))
    tensors: list[torch.Tensor | None] = list(read_checkpoint(path, manifest=manifest, only=wanted).tensors)
    return tensors


def diff_checkpoints(path_a: Where, path_b: Where, progress: Progress | None = None) -> dict:
    """Per leaf path: how B differs from A. Every tensor of both checkpoints is read and verified,
    a batch of about DIFF_BATCH_BYTES at a time, so memory stays bounded on any size. The state
    the ranks of a multi-rank checkpoint kept of their own is compared rank by rank (its rows'
    paths end in ``(rank k)``).

    ``progress`` gets the tensor bytes of each batch read and compared; the increments sum to
    ``diff_total_bytes``.
    """
    manifest_a, manifest_b = read_manifest(path_a), read_manifest(path_b)
    rows: list[dict[str, Any]] = []
    for part in _diff_parts(manifest_a, manifest_b):
        rows += [{**row, "path": row["path"] + part.label} for row in _diff_rows(path_a, path_b, part, progress)]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return {
        "a": {"path": str(path_a), "step": manifest_a.step},
        "b": {"path": str(path_b), "step": manifest_b.step},
        "counts": counts,
        "leaves": rows,
    }


def _diff_rows(path_a: Where, path_b: Where, part: _DiffPart, progress: Progress | None) -> list[dict[str, Any]]:
    manifest_a, manifest_b = part.a, part.b
    a, b = _kept_leaves(manifest_a, part.keep), _kept_leaves(manifest_b, part.keep)
    names = [*a, *(k for k in b if k not in a)]
    # tensor pairs to compare, then the tensors of either side that have no partner: read to verify
    pairs: dict[tuple[int | None, int | None], None] = {}
    for name in names:
        la, lb = a.get(name), b.get(name)
        if la is not None and lb is not None and la.index is not None and lb.index is not None:
            pairs[(la.index, lb.index)] = None
    paired_a = {ia for ia, _ in pairs}
    paired_b = {ib for _, ib in pairs}
    pairs.update(((i, None), None) for i in _indexes(a) if i not in paired_a)
    pairs.update(((None, i), None) for i in _indexes(b) if i not in paired_b)
    compared: dict[tuple[int | None, int | None], dict] = {}
    done_a: set[int] = set()
    done_b: set[int] = set()
    for batch in _batches(list(pairs), manifest_a, manifest_b):
        want_a = {ia for ia, _ in batch if ia is not None} - done_a
        want_b = {ib for _, ib in batch if ib is not None} - done_b
        ta, tb = _read_some(path_a, manifest_a, want_a), _read_some(path_b, manifest_b, want_b)
        for ia, ib in batch:
            if ia is not None and ib is not None:
                x = ta[ia] if ta[ia] is not None else _read_some(path_a, manifest_a, {ia})[ia]
                y = tb[ib] if tb[ib] is not None else _read_some(path_b, manifest_b, {ib})[ib]
                compared[(ia, ib)] = _compare_tensors(x, y)
        done_a |= want_a
        done_b |= want_b
        if progress is not None:
            nbytes = sum(_nbytes(manifest_a, i) for i in want_a) + sum(_nbytes(manifest_b, i) for i in want_b)
            if nbytes:
                progress(nbytes)
    rows: list[dict[str, Any]] = []
    kinds_a, kinds_b = _kept_containers(manifest_a, part.keep), _kept_containers(manifest_b, part.keep)
    for where, kind_a in kinds_a.items():
        kind_b = kinds_b.get(where)
        if kind_b is not None and kind_b != kind_a:
            kinds = {"a": {"kind": kind_a}, "b": {"kind": kind_b}}
            rows.append({"path": where, "status": "kind changed", **kinds, "container": True})
    for name in names:
        la, lb = a.get(name), b.get(name)
        if lb is None:
            rows.append({"path": name, "status": "missing"})  # in A only
        elif la is None:
            rows.append({"path": name, "status": "extra"})  # in B only
        elif la.index is not None and lb.index is not None:
            rows.append({"path": name, **compared[(la.index, lb.index)]})
        elif la.index is not None or lb.index is not None:
            rows.append({"path": name, "status": "kind changed", "a": _kind_of(la), "b": _kind_of(lb)})
        else:
            va, vb = (la.kind, la.value), (lb.kind, lb.value)
            same = type(va[1]) is type(vb[1]) and (
                _float_bits(va[1]) == _float_bits(vb[1]) if isinstance(va[1], float) else va == vb
            )
            row: dict[str, Any] = {"path": name, "status": "equal" if same else "different"}
            if not same:
                row.update(a=va[1], b=vb[1])
            rows.append(row)
    return rows


def _indexes(kept: dict[str, Leaf]) -> list[int]:
    return sorted({leaf.index for leaf in kept.values() if leaf.index is not None})


def _nbytes(manifest: Manifest | None, index: int) -> int:
    assert manifest is not None
    return manifest.tensors[index].nbytes


def _float_bits(value: float) -> bytes:
    """A float leaf as its bits: -0.0 is not 0.0, and a NaN equals a NaN."""
    return struct.pack("<d", value)


def _kind_of(leaf: Leaf) -> dict:
    """What a leaf is, for a diff's "kind changed": its kind, and its value when it is not a tensor."""
    return {"kind": leaf.kind} if leaf.index is not None else {"kind": leaf.kind, "value": leaf.value}


def _kind_text(kind: dict) -> str:
    return f"{kind['kind']} {kind['value']!r}" if "value" in kind else kind["kind"]


def differs(result: dict) -> bool:
    """Whether any leaf of a ``diff_checkpoints`` result differs (the manifests' step numbers are not leaves)."""
    return any(row["status"] != "equal" for row in result["leaves"])


def _g(value: float | str) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def format_diff(result: dict, all_leaves: bool = False) -> str:
    """A header, one line per leaf that differs (every leaf with ``all_leaves``), and the counts."""
    lines = [
        f"A  {result['a']['path']} (step {result['a']['step']})",
        f"B  {result['b']['path']} (step {result['b']['step']})",
    ]
    for row in result["leaves"]:
        status = row["status"]
        if status == "equal" and not all_leaves:
            continue
        detail = ""
        if row.get("bits_only"):
            detail = "  equal in value, not in bits (signed zeros or NaN payloads)"
        elif "max_abs_diff" in row:
            detail = f"  max_abs_diff={_g(row['max_abs_diff'])}  max_rel_diff={_g(row['max_rel_diff'])}"
        elif status == "dtype/shape changed":
            detail = f"  {row['a']['dtype']}{tuple(row['a']['shape'])} -> {row['b']['dtype']}{tuple(row['b']['shape'])}"
        elif status == "different" and "a" in row:
            detail = f"  {row['a']!r} -> {row['b']!r}"
        elif status == "kind changed":
            detail = f"  {_kind_text(row['a'])} -> {_kind_text(row['b'])}"
        elif status == "missing":
            detail = "  (only in A)"
        elif status == "extra":
            detail = "  (only in B)"
        lines.append(f"  {status:<19} {row['path']}{detail}")
    summary = ", ".join(f"{n} {status}" for status, n in sorted(result["counts"].items()))
    same = "the checkpoints differ" if differs(result) else "the checkpoints are equal"
    containers = sum(1 for row in result["leaves"] if row.get("container"))
    counted = f"{len(result['leaves']) - containers} leaves"
    if containers:  # a list become a tuple is no leaf, but its row is counted
        counted += f" and {containers} container{'s' if containers > 1 else ''}"
    lines.append(f"{counted}: {summary or 'none'}; {same}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- export

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e8m0fnu", "F8_E8M0"),
):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXPORT_FORMATS = ("safetensors", "pt")
# .bin: torch.save, as in Hugging Face's pytorch_model.bin
EXPORT_EXTENSIONS = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".bin": "pt"}


def export_format(out: Path, fmt: str | None = None) -> str:
    """The format to write ``out`` in: ``fmt`` when given (it must agree with a known extension),
    else the one its extension names. A ValueError when they disagree or neither says."""
    if fmt is not None and fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (use one of {', '.join(EXPORT_FORMATS)})")
    by_name = EXPORT_EXTENSIONS.get(out.suffix.lower())
    if fmt is None:
        if by_name is None:
            known = ", ".join(EXPORT_EXTENSIONS)
            raise ValueError(f"cannot tell the format of {out} from its extension (known: {known}); give --format")
        return by_name
    if by_name is not None and by_name != fmt:
        raise ValueError(f"--format {fmt} does not match the extension of {out} (a {by_name} file name)")
    return fmt


def _export_tensor(kind: str, tensor: torch.Tensor) -> torch.Tensor:
    """A saved tensor as export writes it; a 0-d numpy leaf becomes shape (1,), as export has always
    written one (it went through ``numpy.ascontiguousarray``, which returns at least one dimension)."""
    return tensor.reshape(1) if kind != Kind.TENSOR and tensor.dim() == 0 else tensor


def _flat_tensors(node: dict, tensors: list) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors under ``node`` named by their keys joined with dots (``layers.0.weight``; a lone
    tensor is named ""), and the names of the non-tensor leaves left out."""
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for visit in skeleton.walk(node, "", skeleton.DOTTED):
        if visit.path in out:
            raise CheckpointError(f"two tensors flatten to the same name {visit.path!r}")
        if visit.kind in TENSOR_KINDS:
            out[visit.path] = _export_tensor(visit.kind, tensors[visit.node[visit.kind]])
        elif visit.kind in _LEAF_KINDS:
            skipped.append(visit.path)
    return out, skipped


@dataclass
class Exported:
    path: Path
    step: int
    tensors: int
    bytes: int
    skipped: list[str]  # non-tensor leaves left out


def flat_export_dict(
    path: Where, key: str, dtype: str | None, per_rank: str = "error"
) -> tuple[int, dict[str, torch.Tensor], list[str]]:
    """The tensors ``export --key`` writes: those under ``key``, named by their keys below it.

    The whole checkpoint is read and verified, as every export always has. ``key`` is resolved as
    ``load_weights(key=...)`` resolves it (``asyncckpt.state.skeleton.subtree``).

    Args:
        path: one checkpoint directory.
        key: the entry to export: ``"model"``, ``"ema.model"``, ``"models.0"``; one tensor's key exports it alone.
        dtype: a key of ``EXPORT_DTYPES`` to cast floating-point tensors to, or None.
        per_rank: for a checkpoint of several ranks, the tensors each rank kept of its own under
            ``key``: ``"error"`` (the default, as ``asyncckpt.load``'s) or ``"rank0"`` (rank 0's).

    Returns:
        The checkpoint's step, the tensors by name, and the names of the non-tensor leaves left out.

    Raises:
        CheckpointError: the checkpoint cannot be read, ``key`` names nothing (the message lists
            what exists), holds no tensor, or holds tensors each rank kept of its own (unless
            ``per_rank="rank0"``).
    """
    loaded = read_checkpoint(path)
    node = skeleton.subtree(loaded.manifest.tree, key, str(path))
    manifest = loaded.manifest
    if isinstance(manifest, MultiRankManifest) and manifest.world_size > 1 and per_rank != "rank0":
        own = [
            visit.path
            for visit in skeleton.walk(node, key, skeleton.DOTTED)
            if visit.kind in TENSOR_KINDS and visit.node[visit.kind] < manifest.local_count
        ]
        if own:
            shown = ", ".join(own[:5]) + (f" and {len(own) - 5} more" if len(own) > 5 else "")
            raise CheckpointError(
                f"{path} was saved by {manifest.world_size} ranks, and each kept its own {shown}: "
                "pass --per-rank rank0 to export rank 0's"
            )
    flat, skipped = _flat_tensors(node, loaded.tensors)
    if not flat:
        raise CheckpointError(f"{path}: key {key!r} holds no tensors")
    if skeleton.kind_of(node) in TENSOR_KINDS:  # --key named one tensor (not a dict with a key "")
        flat = {key: flat.pop("")}
    if dtype is not None:
        target = EXPORT_DTYPES[dtype]
        flat = {n: t.to(target) if t.is_floating_point() else t for n, t in flat.items()}
    return loaded.manifest.step, flat, skipped


def safetensors_bytes_header(flat: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list]:
    """The safetensors header (length prefix included) and the tensors' byte views, in file order."""
    if sys.byteorder != "little":
        raise CheckpointError("safetensors export needs a little-endian host")
    if "__metadata__" in flat:
        raise CheckpointError(
            "a tensor is named '__metadata__', the safetensors header's entry for metadata: "
            "use --format pt, or export a --key below it"
        )
    header: dict[str, Any] = {"__metadata__": metadata}
    payloads = []
    offset = 0
    for name in sorted(flat):
        t = flat[name]
        code = SAFETENSORS_DTYPES.get(t.dtype)
        if code is None:
            raise CheckpointError(
                f"{name}: dtype {str(t.dtype).removeprefix('torch.')} has no safetensors code; use --format pt"
            )
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + data.numel()]}
        offset += data.numel()
        payloads.append(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded, payloads


def _holds_checkpoints(directory: Path) -> bool:
    """Whether ``directory`` is a checkpoint (it holds a manifest) or a checkpoint root (the writer's
    ``.lock`` or a step directory). Only the output's own directory counts: a root's parents are
    ordinary folders, and what a user keeps in a subfolder of a root the library never touches."""
    try:
        if (directory / MANIFEST_NAME).exists() or (directory / LOCK_NAME).exists():
            return True
        with os.scandir(directory) as entries:
            return any(parse_step_dir(e.name) is not None and e.is_dir(follow_symlinks=False) for e in entries)
    except OSError:  # not listable: the write fails later with the reason
        return False


def check_export_target(out: Path, overwrite: bool = False) -> bool:
    """Refuse an output that would damage something: a path inside a checkpoint or a checkpoint
    root (the export would replace a checkpoint's own files, or sit among them), a symbolic link
    (the write would land on whatever it points to), or an existing file unless ``overwrite``.
    Whether ``out`` exists now (so the caller can say it replaced it)."""
    out = Path(out)
    if out.is_symlink():
        raise CheckpointError(f"output {out} is a symbolic link; refusing to write through it (name the file itself)")
    parent = Path(os.path.realpath(out.parent))  # a linked directory is judged by what it links to
    if _holds_checkpoints(parent):
        what = "checkpoint" if (parent / MANIFEST_NAME).exists() else "checkpoint root"
        raise CheckpointError(
            f"output {out} is inside the {what} {parent}; export writes outside checkpoint roots, "
            "never among a checkpoint's files"
        )
    if out.is_dir():
        raise CheckpointError(f"output {out} is a directory")
    if out.exists() and not out.is_file():  # a device, a FIFO, a socket: replacing it is never an export
        raise CheckpointError(
            f"output {out} is {describe_file_kind(out.stat().st_mode)}, not a regular file; refusing to replace it"
        )
    exists = os.path.lexists(out)
    if exists and not overwrite:
        raise CheckpointError(f"output {out} already exists; give --force to replace it")
    return exists


def _atomic_write(out: Path, write, overwrite: bool = False) -> None:
    """Write through a temp file in OUT's directory, then rename it over OUT and fsync the directory
    (the rename survives a power cut). The file gets the mode any new file gets (0666 less the
    umask), and a missing directory is an error: a typo must not create a tree."""
    parent = out.parent
    if not parent.is_dir():
        reason = "is not a directory" if parent.exists() else "does not exist"
        raise CheckpointError(f"cannot write {out}: its directory {parent} {reason}")
    while True:
        tmp = parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, out)
        else:
            os.link(tmp, out)  # fails if OUT appeared meanwhile: never replaces a file unasked
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(parent)


WRITE_SLICE = 64 << 20  # a huge tensor is written (and its progress reported) in slices of this many bytes


class _CountingWriter:
    """A write-only file for torch.save that reports bytes written, capped so the reports sum to ``total``."""

    def __init__(self, f, total: int, progress: Progress) -> None:
        self.f, self.left, self.progress = f, total, progress

    def write(self, data) -> int:
        n = self.f.write(data)
        step = min(self.left, len(memoryview(data).cast("B")) if n is None else n)
        if step:
            self.left -= step
            self.progress(step)
        return n

    def flush(self) -> None:
        self.f.flush()


def exported_bytes(flat: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in flat.values())


def write_export(
    out: Path,
    step: int,
    flat: dict[str, torch.Tensor],
    key: str = "model",
    fmt: str | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> int:
    """Write ``flat`` (from flat_export_dict) to ``out`` atomically; the tensor bytes written.

    ``fmt`` None takes the format from ``out``'s extension (``export_format``). ``out`` must pass
    ``check_export_target`` (an existing file is replaced only with ``overwrite``).

    ``progress`` gets increments summing to exactly the tensor bytes: per tensor (huge ones per
    slice) for safetensors; for pt, as torch.save writes, the file's overhead left out.
    """
    check_export_target(out, overwrite)
    try:
        fmt = export_format(out, fmt)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    total = exported_bytes(flat)
    if fmt == "safetensors":
        metadata = {"format": "pt", "asyncckpt_step": str(step), "asyncckpt_key": key}
        head, payloads = safetensors_bytes_header(flat, metadata)

        def write(f) -> None:
            f.write(head)
            for data in payloads:
                if not data.numel():
                    continue
                view = memoryview(data.numpy())
                for start in range(0, len(view), WRITE_SLICE):
                    piece = view[start : start + WRITE_SLICE]
                    f.write(piece)
                    if progress is not None:
                        progress(len(piece))

    elif fmt == "pt":

        def write(f) -> None:
            if progress is None:
                torch.save(flat, f)
                return
            counting = _CountingWriter(f, total, progress)
            torch.save(flat, cast(IO[bytes], counting))  # torch.save only calls write and flush
            if counting.left:
                progress(counting.left)

    else:
        raise CheckpointError(f"unknown export format {fmt!r}")
    try:
        _atomic_write(out, write, overwrite)
    except FileExistsError:
        raise CheckpointError(f"output {out} already exists (created while exporting); nothing replaced") from None
    except OSError as exc:
        raise CheckpointError(f"cannot write {out}: {exc}") from exc
    return total


def export_checkpoint(
    path: Where,
    out: Path,
    key: str = "model",
    dtype: str | None = None,
    fmt: str | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    per_rank: str = "error",
) -> Exported:
    """Export the tensors under ``key`` of the checkpoint at ``path``; ``progress`` and ``overwrite``
    as in write_export, ``per_rank`` as in flat_export_dict."""
    check_export_target(out, overwrite)  # before reading the checkpoint
    step, flat, skipped = flat_export_dict(path, key, dtype, per_rank)
    nbytes = write_export(out, step, flat, key, fmt, progress, overwrite)
    return Exported(out, step, len(flat), nbytes, skipped)


# ------------------------------------------------------------------------------------------ prune


@dataclass
class Pruned:
    kept: list[int]
    deleted: list[int]  # or, with dry_run, would be deleted
    unreadable: dict[int, str] = field(default_factory=dict)  # kept: their manifests cannot be read (why)
    damaged: dict[int, str] = field(default_factory=dict)  # kept: newer than the newest that verifies (why)


def _is_asyncckpt_name(name: str) -> bool:
    return (
        name in (LOCK_NAME, METRICS_LOG, MIRROR_FILE)
        or name.startswith(TEMP_PREFIX)
        or parse_step_dir(name) is not None
    )


def root_checkpoints(root: Path | str) -> list[CommittedCheckpoint]:
    """The committed checkpoints of the directory ``root``, or a CheckpointError when it is not a
    checkpoint root: it holds no checkpoint and none of the files a manager leaves (an empty folder
    included). ``ls``, ``verify`` and ``prune`` apply this one rule; a root with no checkpoint is an
    empty list. An object-store root (a URL) is any prefix: one with no checkpoint is an empty list."""
    if is_object_store_url(root):
        return published_checkpoints(open_target(root)[0])
    root = Path(root)
    try:
        committed = Catalog.of_reader(root).checkpoints()
        names = [entry.name for entry in os.scandir(root)]
    except FileNotFoundError:
        raise CheckpointError(f"{root} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot list checkpoint root {root}: {exc.strerror}") from None
    if not committed and not any(_is_asyncckpt_name(name) for name in names):
        raise CheckpointError(f"{root} is not a checkpoint root: it holds no checkpoint and no asyncckpt files")
    return committed


def mirror_checkpoints(location: str) -> list[CommittedCheckpoint]:
    """The committed checkpoints of a mirror root, as a reader lists them (an empty list when it
    holds none, or does not exist yet).

    Args:
        location: The mirror's path or URL.

    Returns:
        Its committed checkpoints, oldest first.

    Raises:
        CheckpointError: It cannot be listed.
    """
    return Catalog.of_reader(location).checkpoints()


def _check_prunable(root: Path | str, policy: RetentionPolicy) -> list[CommittedCheckpoint]:
    """The committed checkpoints, once ``root`` is known to be a checkpoint root and the policy's
    metric to exist: checked before the lock is taken, so a wrong folder gets no ``.lock``."""
    committed = root_checkpoints(root)
    infos = Catalog(lambda: committed).infos()
    if committed and best_metric_missing(infos, policy):
        raise CheckpointError(f"no checkpoint in {root} {missing_metric_text(infos, policy)}; nothing deleted")
    return committed


def _newest_verified(committed: list[CommittedCheckpoint], infos: list[CheckpointInfo]) -> dict[int, str]:
    """The checkpoints newer than the newest that verifies whole (its manifest and every chunk's
    checksum), checked newest first up to that one, with why each failed. ``prune`` keeps them and
    does not count them among the newest, as one whose manifest cannot be read: a newer checkpoint
    whose data is damaged must not cost the last good one. Usually one checkpoint is read."""
    damaged: dict[int, str] = {}
    for checkpoint, info in reversed(list(zip(committed, infos, strict=True))):
        if info.unreadable is not None:
            continue
        try:
            verify_checkpoint(checkpoint.ref)
        except CheckpointError as exc:
            damaged[checkpoint.step] = str(exc)
            continue
        break
    return damaged


def _doomed(infos: list[CheckpointInfo], damaged: dict[int, str], policy: RetentionPolicy) -> set[int]:
    marked = [
        dataclasses.replace(i, unreadable=damaged[i.step]) if i.step in damaged else i for i in infos
    ]  # kept, and not among the newest
    return set(steps_to_delete(marked, policy))


def prune(root: Path | str, policy: RetentionPolicy, dry_run: bool = False) -> Pruned:
    """Delete what ``policy`` does not keep; takes the root's writer lock unless ``dry_run``.

    A folder that is not a checkpoint root, or a ``keep_best`` metric no checkpoint carries, is a
    CheckpointError before anything is touched. The newest checkpoint that verifies is always
    kept, and so is every newer one (see ``_newest_verified``).
    """
    root = resolve_root(root)
    committed = _check_prunable(root, policy)
    if dry_run or not committed:
        infos = Catalog(lambda: committed).infos()
        damaged = _newest_verified(committed, infos)
        doomed = _doomed(infos, damaged, policy)
    else:
        storage = open_storage(root)  # raises 'in use by another writer' while a manager is live
        try:
            catalog = Catalog.of_writer(storage)
            entries = catalog.entries()
            committed = [c for c, _ in entries]
            infos = [info for _, info in entries]
            damaged = _newest_verified(committed, infos)
            doomed = _doomed(infos, damaged, policy)
            deleted: list[int] = []
            for c in committed:
                if c.step in doomed:
                    try:
                        catalog.delete(c)
                    except (OSError, CheckpointError) as exc:  # a local error, or a store's
                        done = f"deleted steps {deleted}, then " if deleted else ""
                        raise CheckpointError(
                            f"prune {done}failed deleting step {c.step} of {root} ({exc}); "
                            "the steps after it were not touched"
                        ) from exc
                    deleted.append(c.step)
        finally:
            storage.close()
    unreadable = {i.step: i.unreadable for i in infos if i.unreadable is not None}
    return Pruned([c.step for c in committed if c.step not in doomed], sorted(doomed), unreadable, damaged)


@dataclass
class RolledBack:
    """What ``prune --after`` deleted (or, with dry_run, would delete) from each tier."""

    root: list[int]
    mirror: list[int]


def _rollback_target(step: int, tiers: dict[str, list[CommittedCheckpoint]], where: str) -> None:
    """``step`` must stay loadable: a committed checkpoint that verifies in one of the tiers. A
    mistyped step would otherwise delete every checkpoint above it, the good ones included."""
    reasons = why_no_tier_verifies(step, tiers)
    if reasons is None:
        return
    why = f"it does not verify ({'; '.join(reasons)})" if reasons else "it is not a committed checkpoint"
    raise CheckpointError(
        f"cannot roll back to step {step} of {where}: {why}; nothing deleted. --after N deletes the steps above "
        "N, the checkpoint rolled back to, which must remain"
    )


def _refuse_tagged(step: int, tiers: dict[str, list[tuple[CommittedCheckpoint, CheckpointInfo]]]) -> None:
    tagged = tagged_above({tier: [info for _, info in entries] for tier, entries in tiers.items()}, step)
    if tagged:
        raise CheckpointError(
            f"tagged checkpoints above step {step}: {tagged}; nothing deleted. Pass --include-tagged to delete them too"
        )


def _entries(committed: list[CommittedCheckpoint]) -> list[tuple[CommittedCheckpoint, CheckpointInfo]]:
    return Catalog(lambda: committed).entries()


def prune_after(
    root: Path | str,
    step: int,
    *,
    mirror: str | None,
    mirror_must_hold_step: bool = False,
    include_tagged: bool = False,
    dry_run: bool = False,
) -> RolledBack:
    """Delete every checkpoint above ``step`` from ``root`` and from ``mirror``: a rollback.

    ``restore`` and ``load`` read the highest step of either tier, so after training was rolled
    back to ``step`` the abandoned run's later checkpoints must go from both, or a crash resumes
    that run. Nothing is deleted unless ``step`` is a checkpoint that verifies in one tier (and, with
    ``mirror_must_hold_step``, one the mirror holds: a mirror named by hand may be another job's
    root) and, without ``include_tagged``, no checkpoint above it may be tagged. Unless ``dry_run``,
    each tier's writer lock is taken first (refused while a manager writes there), so what is
    checked is what is deleted; the mirror is pruned first, newest first.
    """
    root = resolve_root(root)
    where = str(root)
    root_checkpoints(root)  # a folder that is not a checkpoint root is refused before any lock
    if mirror is not None and not is_object_store_url(mirror) and not os.path.isdir(mirror):
        raise CheckpointError(f"the mirror {mirror} is not a directory; nothing deleted")  # (and none made)
    if dry_run:
        listed = {"root": root_checkpoints(root)}
        if mirror is not None:
            listed["mirror"] = mirror_checkpoints(mirror)
        entries = {tier: _entries(committed) for tier, committed in listed.items()}
        _check_rollback(step, entries, where, mirror, mirror_must_hold_step, include_tagged)
        above = {tier: [c.step for c, _ in e if c.step > step] for tier, e in entries.items()}
        return RolledBack(above["root"], above.get("mirror", []))
    storages: dict[str, Any] = {}
    try:
        if mirror is not None:
            storages["mirror"] = open_storage(mirror)
        storages["root"] = open_storage(root)
        catalogs = {tier: Catalog.of_writer(storages[tier]) for tier in ("root", "mirror") if tier in storages}
        entries = {tier: catalog.entries() for tier, catalog in catalogs.items()}
        _check_rollback(step, entries, where, mirror, mirror_must_hold_step, include_tagged)
        deleted: dict[str, list[int]] = {"root": [], "mirror": []}
        for tier in ("mirror", "root"):
            if tier in catalogs:
                try:
                    deleted[tier] = catalogs[tier].delete_above(step)
                except CheckpointError as exc:
                    done = f"deleted steps {deleted['mirror']} from the mirror; " if deleted["mirror"] else ""
                    raise CheckpointError(
                        f"prune --after {step}: {done}in the {tier}: {exc}; run it again to finish the rollback"
                    ) from exc
    finally:
        for storage in storages.values():
            storage.close()
    return RolledBack(sorted(deleted["root"]), sorted(deleted["mirror"]))


def _check_rollback(
    step: int,
    entries: dict[str, list[tuple[CommittedCheckpoint, CheckpointInfo]]],
    where: str,
    mirror: str | None,
    mirror_must_hold_step: bool,
    include_tagged: bool,
) -> None:
    """What ``prune_after`` refuses, before it deletes anything."""
    if mirror_must_hold_step and not any(c.step == step for c, _ in entries.get("mirror", [])):
        raise CheckpointError(
            f"the mirror {mirror} holds no step {step}, and {where} records another mirror (or none): is it this "
            "root's mirror? Nothing deleted"
        )
    _rollback_target(step, {tier: [c for c, _ in e] for tier, e in entries.items()}, where)
    if not include_tagged:
        _refuse_tagged(step, entries)
