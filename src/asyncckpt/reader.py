"""Read a committed checkpoint back into tensors: validate, read chunks in parallel, verify, decode.

The whole checkpoint is verified into host memory before anything is handed back, so a restore
either applies a fully verified state or applies nothing.
"""

from __future__ import annotations

import bisect
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import codec
from .errors import CheckpointError
from .format import (
    DTYPES,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    check_manifest_seal,
    parse_manifest,
    parse_step_dir,
)
from .storage import open_data_file, read_file_no_follow


@dataclass
class LoadedCheckpoint:
    path: Path
    manifest: Manifest
    tensors: list[torch.Tensor]


def read_manifest(path: Path) -> Manifest:
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symbolic link; checkpoints never follow links")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.exists() and not manifest_path.is_symlink():
        raise CheckpointError(f"{path} has no {MANIFEST_NAME}: not a committed checkpoint")
    raw = read_file_no_follow(manifest_path, MAX_MANIFEST_BYTES)
    check_manifest_seal(raw, str(manifest_path))
    manifest = parse_manifest(raw, str(manifest_path))
    named = parse_step_dir(path.name)
    if named is not None and named != manifest.step:
        raise CheckpointError(f"{manifest_path} is the manifest of step {manifest.step}, not of {path.name}")
    return manifest


def _tensor_names(manifest: Manifest, start: int, end: int) -> str:
    hits = [i for i, t in enumerate(manifest.tensors) if t.offset < end and t.offset + t.nbytes > start]
    shown = ", ".join(f"#{i} {manifest.tensors[i].dtype}{list(manifest.tensors[i].shape)}" for i in hits[:4])
    more = f" and {len(hits) - 4} more" if len(hits) > 4 else ""
    return f"tensors {shown}{more}" if hits else "padding only"


class _Scatter:
    """Routes a decoded chunk's bytes into the tensors it overlaps (each tensor owns its storage)."""

    def __init__(self, manifest: Manifest, only: set[int] | None = None) -> None:
        entries = manifest.tensors
        wanted = set(range(len(entries))) if only is None else only
        try:
            self.buffers = [
                torch.empty(t.nbytes, dtype=torch.uint8) if i in wanted else None for i, t in enumerate(entries)
            ]
        except RuntimeError as exc:
            raise CheckpointError(f"cannot allocate {manifest.raw_bytes} bytes of tensors: {exc}") from None
        self._order = sorted((i for i in wanted if entries[i].nbytes), key=lambda i: entries[i].offset)
        self._starts = [entries[i].offset for i in self._order]
        self._entries = entries

    def overlapping(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(tensor index, first byte, end byte) of every tensor overlapping [start, end)."""
        out = []
        j = max(0, bisect.bisect_right(self._starts, start) - 1)
        while j < len(self._order) and self._starts[j] < end:
            i = self._order[j]
            entry = self._entries[i]
            a, b = max(start, entry.offset), min(end, entry.offset + entry.nbytes)
            if a < b:
                out.append((i, a, b))
            j += 1
        return out

    def target(self, start: int, end: int) -> torch.Tensor | None:
        """The tensor slice to decode into directly when one tensor holds the whole range."""
        hits = self.overlapping(start, end)
        if len(hits) == 1 and hits[0][1:] == (start, end):
            i = hits[0][0]
            base = self._entries[i].offset
            return self.buffers[i][start - base : end - base]
        return None

    def scatter(self, decoded: torch.Tensor, start: int, end: int) -> None:
        for i, a, b in self.overlapping(start, end):
            base = self._entries[i].offset
            self.buffers[i][a - base : b - base].copy_(decoded[a - start : b - start])

    def needs(self, start: int, end: int) -> bool:
        return bool(self.overlapping(start, end))

    def tensors(self) -> list[torch.Tensor | None]:
        """Every tensor read (None for those not asked for)."""
        return [
            None if buf is None else buf.view(DTYPES[t.dtype]).view(t.shape)
            for buf, t in zip(self.buffers, self._entries, strict=True)
        ]


def read_checkpoint(
    path: Path, workers: int = 4, manifest: Manifest | None = None, only: set[int] | None = None
) -> LoadedCheckpoint:
    """Read and verify every chunk of the checkpoint at ``path`` into CPU tensors (all or none).

    Each tensor gets its own storage (not a view of one big buffer): a loaded tensor can be kept,
    saved with torch.save or exported without dragging the rest of the checkpoint along.
    """
    manifest = manifest or read_manifest(path)
    fds: dict[str, int] = {}
    sizes: dict[str, int] = {}
    try:
        for chunk in manifest.chunks:
            if chunk.file not in fds:
                fds[chunk.file] = open_data_file(path / chunk.file)
                sizes[chunk.file] = os.fstat(fds[chunk.file]).st_size
            if chunk.offset + chunk.length > sizes[chunk.file]:
                raise CheckpointError(
                    f"{path / chunk.file} is truncated: a chunk for "
                    f"{_tensor_names(manifest, chunk.raw_offset, chunk.raw_offset + chunk.raw_length)} "
                    f"ends at byte {chunk.offset + chunk.length}, the file has {sizes[chunk.file]}"
                )
        scatter = _Scatter(manifest, only)
        # a partial read (``only``) skips chunks that hold none of the wanted tensors
        wanted_chunks = [
            i
            for i, c in enumerate(manifest.chunks)
            if only is None or scatter.needs(c.raw_offset, c.raw_offset + c.raw_length)
        ]

        def load_chunk(index: int) -> None:
            chunk = manifest.chunks[index]
            try:
                stored = os.pread(fds[chunk.file], chunk.length, chunk.offset)
            except OSError as exc:
                raise CheckpointError(f"cannot read chunk {index} of {path / chunk.file}: {exc.strerror}") from exc
            if len(stored) != chunk.length:
                raise CheckpointError(f"short read of chunk {index} in {path / chunk.file}")
            start, end = chunk.raw_offset, chunk.raw_offset + chunk.raw_length
            direct = scatter.target(start, end)
            out = direct if direct is not None else torch.empty(chunk.raw_length, dtype=torch.uint8)
            try:
                codec.decode(stored, chunk.codecs, chunk.crc32, out, f"chunk {index}")
            except CheckpointError as exc:
                # names are worked out only on failure: they cost a scan of the tensor table
                raise CheckpointError(
                    f"{path / chunk.file}: {exc} (holds {_tensor_names(manifest, start, end)})"
                ) from None
            if direct is None:
                scatter.scatter(out, start, end)

        if workers > 1 and len(wanted_chunks) > 1:
            with ThreadPoolExecutor(min(workers, len(wanted_chunks)), "asyncckpt-read") as pool:
                for future in [pool.submit(load_chunk, i) for i in wanted_chunks]:
                    future.result()
        else:
            for i in wanted_chunks:
                load_chunk(i)
    finally:
        for fd in fds.values():
            os.close(fd)
    return LoadedCheckpoint(path, manifest, scatter.tensors())
