"""reader._read_ahead: POSIX_FADV_WILLNEED over the wanted chunks of a local data file."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from asyncckpt.engine import reader

MiB = 1 << 20


def resident_bytes(path) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        pages = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        assert libc.mincore(ctypes.c_void_p(view.ctypes.data), size, pages) == 0
        del view
    return sum(p & 1 for p in pages) * mmap.PAGESIZE


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not os.path.exists("/proc/self"), reason="Linux only")
@pytest.mark.xfail(
    strict=True,
    reason="Linux caps one WILLNEED at max(io_pages, ra_pages) pages (force_page_cache_ra): "
    "a merged run of contiguous chunks gets only its first few MiB read ahead",
)
def test_every_wanted_chunk_is_read_ahead(tmp_path):
    path = tmp_path / "data.bin"
    size, chunk = 128 * MiB, 4 * MiB
    with open(path, "wb") as f:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if resident_bytes(path) > 4 * MiB:
            pytest.skip("this filesystem keeps the file in memory (tmpfs?): nothing to read ahead")
        chunks = [SimpleNamespace(file="d", offset=o, length=chunk) for o in range(0, size, chunk)]
        manifest = SimpleNamespace(chunks=chunks)
        reader._read_ahead(manifest, {"d": SimpleNamespace(fileno=lambda: fd)}, list(range(len(chunks))))
        deadline = time.monotonic() + 5
        while resident_bytes(path) < size * 0.9 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert resident_bytes(path) >= size * 0.9
    finally:
        os.close(fd)
