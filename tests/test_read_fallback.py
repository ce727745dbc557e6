"""What makes a reader of a root fall back to an older checkpoint, and what a damaged one costs.

Only a failure of the checkpoint (damage, a hostile manifest, memory, a file error) falls back; a
bug in the reader propagates, and a key missing from the state is final whatever the messages say.
A damaged chunk stops the read: the chunks after it are not read.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import asyncckpt
import asyncckpt.loading as loading
from asyncckpt import CheckpointDamagedError, CheckpointError, CheckpointManager
from asyncckpt.engine.reader import read_checkpoint, read_manifest, verify_checkpoint

DATA = "data-00000.bin"


def test_a_bug_raised_while_reading_the_newest_propagates_instead_of_falling_back(tmp_path, monkeypatch):
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(1, {"w": torch.ones(3)}).wait()
        mgr.save(2, {"w": torch.ones(3)}).wait()
    read = loading.read_checkpoint

    def buggy(path, *args, **kwargs):
        if path.name.endswith("2"):
            raise TypeError("a bug in the reader")
        return read(path, *args, **kwargs)

    monkeypatch.setattr(loading, "read_checkpoint", buggy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: a warning, then step 1 loaded as if step 2 were damaged
        with pytest.raises(TypeError, match="a bug in the reader"):
            asyncckpt.load(tmp_path)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path / DATA, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_load_weights_falls_back_from_damage_whose_message_reads_like_a_missing_key(tmp_path):
    key = "has no entry"  # the damage message names the tensor by its path, which holds this key
    model = torch.nn.Linear(8, 8)
    with CheckpointManager(tmp_path, keep_last=None, compression=None) as mgr:
        mgr.save(1, {key: model}).wait()
        newest = mgr.save(2, {key: model}).wait()
    _flip_byte(newest, 5)
    target = torch.nn.Linear(8, 8)
    with pytest.warns(UserWarning, match="has no entry"):  # before: raised as if the key were missing
        assert asyncckpt.load_weights(tmp_path, target, key=key) == 1
    assert torch.equal(target.weight, model.weight)
    with pytest.raises(CheckpointError, match="has no entry 'ema'"):  # a missing key is final: no fallback
        asyncckpt.load_weights(tmp_path, target, key="ema")


def _io_bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.fixture
def many_chunks(tmp_path) -> Path:
    """A raw checkpoint of 256 chunks of 64 KiB, its first chunk damaged."""
    with CheckpointManager(tmp_path, compression=None, chunk_size=64 << 10) as mgr:
        path = mgr.save(1, {"w": torch.randn(4 << 20)}).wait()
    assert len(read_manifest(path).chunks) == 256
    _flip_byte(path, 100)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/io")
@pytest.mark.parametrize("how", ["read", "verify"])
def test_a_damaged_first_chunk_stops_the_read_before_the_rest_is_read(many_chunks, how):
    before = _io_bytes_read()
    with pytest.raises(CheckpointDamagedError, match="checksum mismatch in chunk 0"):
        if how == "read":
            read_checkpoint(many_chunks, workers=4)
        else:
            verify_checkpoint(many_chunks, workers=4)
    read = _io_bytes_read() - before
    # at most the chunks in flight (2 per thread) and the one that failed; before: all 16 MiB
    assert read < 1.5 * (9 * (64 << 10)), read
