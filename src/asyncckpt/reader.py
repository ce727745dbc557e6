"""Read a committed checkpoint back into tensors: validate, read chunks in parallel, verify, decode.

The whole checkpoint is verified into host memory before anything is handed back, so a restore
either applies a fully verified state or applies nothing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import codec
from .errors import CheckpointError
from .format import DTYPES, MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, parse_manifest
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
    return parse_manifest(read_file_no_follow(manifest_path, MAX_MANIFEST_BYTES), str(manifest_path))


def _tensor_names(manifest: Manifest, start: int, end: int) -> str:
    hits = [i for i, t in enumerate(manifest.tensors) if t.offset < end and t.offset + t.nbytes > start]
    shown = ", ".join(f"#{i} {manifest.tensors[i].dtype}{list(manifest.tensors[i].shape)}" for i in hits[:4])
    more = f" and {len(hits) - 4} more" if len(hits) > 4 else ""
    return f"tensors {shown}{more}" if hits else "padding only"


def read_checkpoint(path: Path, workers: int = 4, manifest: Manifest | None = None) -> LoadedCheckpoint:
    """Read and verify every chunk of the checkpoint at ``path`` into CPU tensors."""
    manifest = manifest or read_manifest(path)
    try:
        raw = torch.empty(manifest.raw_bytes, dtype=torch.uint8)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot allocate {manifest.raw_bytes} bytes for {path}: {exc}") from None
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

        def load_chunk(index: int) -> None:
            chunk = manifest.chunks[index]
            stored = os.pread(fds[chunk.file], chunk.length, chunk.offset)
            if len(stored) != chunk.length:
                raise CheckpointError(f"short read of chunk {index} in {path / chunk.file}")
            end = chunk.raw_offset + chunk.raw_length
            try:
                codec.decode(stored, chunk.codecs, chunk.crc32, raw[chunk.raw_offset : end], f"chunk {index}")
            except CheckpointError as exc:
                # names are worked out only on failure: they cost a scan of the tensor table
                raise CheckpointError(
                    f"{path / chunk.file}: {exc} (holds {_tensor_names(manifest, chunk.raw_offset, end)})"
                ) from None

        if workers > 1 and len(manifest.chunks) > 1:
            with ThreadPoolExecutor(min(workers, len(manifest.chunks)), "asyncckpt-read") as pool:
                for future in [pool.submit(load_chunk, i) for i in range(len(manifest.chunks))]:
                    future.result()
        else:
            for i in range(len(manifest.chunks)):
                load_chunk(i)
    finally:
        for fd in fds.values():
            os.close(fd)
    tensors = [
        raw[t.offset : t.offset + t.nbytes].view(DTYPES[t.dtype]).view(t.shape) for t in manifest.tensors
    ]
    return LoadedCheckpoint(path, manifest, tensors)
