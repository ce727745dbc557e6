"""codec/crc.py: ISA-L's CRC32 where installed is zlib's CRC32, and checkpoints cross between them."""

from __future__ import annotations

import subprocess
import sys
import zlib

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt.codec import crc


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4096), start=st.integers(min_value=0, max_value=2**32 - 1))
def test_crc32_is_zlibs_crc32(data, start):
    assert crc.crc32(data, start) == zlib.crc32(data, start)
    assert crc.crc32(memoryview(data), 0) == zlib.crc32(data)


def test_crc32_of_a_large_buffer_in_pieces_is_the_whole_ones():
    data = torch.randint(0, 256, (5 << 20,), dtype=torch.uint8).numpy().tobytes()
    value = 0
    for at in range(0, len(data), 1 << 20):
        value = crc.crc32(memoryview(data)[at : at + (1 << 20)], value)
    assert value == zlib.crc32(data)


_WITHOUT_ISAL = "import sys; sys.modules['isal'] = None; sys.modules['isal.isal_zlib'] = None\n"


def test_without_isal_zlib_computes_it_and_checkpoints_cross_over(tmp_path):
    """A checkpoint written where isal is missing loads where it is installed, and the reverse."""
    state = {"w": torch.randn(300, 70), "i": torch.arange(1000)}
    with asyncckpt.CheckpointManager(tmp_path / "here", workers=1) as mgr:
        mgr.save(1, state).wait()
    script = _WITHOUT_ISAL + (
        "import torch, asyncckpt\n"
        "from asyncckpt.codec import crc\n"
        "assert crc.PROVIDER == 'zlib', crc.PROVIDER\n"
        f"loaded = asyncckpt.load({str(tmp_path / 'here')!r})\n"
        "torch.save(loaded, sys.argv[1])\n"
        f"with asyncckpt.CheckpointManager({str(tmp_path / 'there')!r}, workers=1) as mgr:\n"
        "    mgr.save(1, loaded).wait()\n"
    )
    out = tmp_path / "loaded.pt"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=120)
    for loaded in (torch.load(out), asyncckpt.load(tmp_path / "there")):
        assert all(torch.equal(loaded[k], state[k]) for k in state)
