"""Hostile checkpoint directories: reading costs what the manifest declares, and fails cleanly.

Each directory is small on disk (sparse files, a zstd bomb). The loads that could cost memory run
in a child process that reports its peak RSS (VmHWM) and runs under an address-space limit, so a
regression fails the test instead of taking the machine's memory. The goal asserted: peak RSS is
at most the tensor bytes the manifest declares plus 512 MiB.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import zstandard

import asyncckpt
from asyncckpt import CheckpointDamagedError, CheckpointManager, CheckpointNotFoundError
from asyncckpt.cli.commands import main as cli_main
from asyncckpt.engine.reader import read_checkpoint, read_manifest, verify_checkpoint
from asyncckpt.format import MANIFEST_NAME, ChunkEntry, Manifest, TensorEntry, seal_manifest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

MiB = 1 << 20
GiB = 1 << 30
HEADROOM = 512 * MiB  # what a read may hold beyond the tensors it returns
DATA = "data-00000.bin"
ZSTD = [{"id": "zstd", "level": 1}]

_CHILD = r"""
import json, resource, sys, warnings
import asyncckpt
from asyncckpt.engine.reader import read_manifest, verify_checkpoint
from pathlib import Path

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

limit = status("VmSize") + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out = {}
try:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scope = {"asyncckpt": asyncckpt, "Path": Path, "read_manifest": read_manifest, "verify": verify_checkpoint}
        exec(sys.argv[1], scope)
    out["result"] = scope.get("result")
    out["warnings"] = [str(w.message) for w in caught]
except BaseException as exc:
    out["error"] = type(exc).__name__
    out["message"] = str(exc)[:2000]
out["peak"] = status("VmHWM")
print(json.dumps(out))
"""


def in_child(code: str, address_space: int = 3 * GiB) -> dict:
    """Run ``code`` (which may set ``result``) in a fresh interpreter; its outcome and peak RSS."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, code, str(address_space)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- building hostile directories --------------------------------------------------------------


def write_checkpoint(path: Path, manifest: Manifest, data: bytes | None = None, size: int | None = None) -> Path:
    """A checkpoint directory with ``manifest`` and a data file of ``data``, then extended (sparse)
    to ``size`` bytes."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / DATA, "wb") as f:
        if data:
            f.write(data)
        if size is not None:
            f.truncate(size)
    (path / MANIFEST_NAME).write_bytes(manifest.to_json())
    return path


def one_tensor_manifest(step: int, nbytes: int, chunk: ChunkEntry) -> Manifest:
    return Manifest(
        step=step,
        created=time.time(),
        tree={"d": [["w", {"T": 0}]]},
        tensors=[TensorEntry("float32", (nbytes // 4,), 0, nbytes)],
        chunks=[chunk],
        raw_bytes=nbytes,
        stored_bytes=chunk.length,
    )


def sparse_stored_chunk(path: Path, step: int = 2) -> Path:
    """128 bytes of tensors whose one zstd chunk claims 2 GiB of stored bytes (a sparse file)."""
    chunk = ChunkEntry(DATA, 0, 2 * GiB, 0, 128, ZSTD, 0)
    return write_checkpoint(path, one_tensor_manifest(step, 128, chunk), size=2 * GiB)


def zstd_bomb(raw_length: int, tail: bytes = b"") -> bytes:
    """A tiny zstd frame of ``raw_length`` zero bytes (declared in its header), plus ``tail``."""
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
    parts = []
    piece = bytes(8 * MiB)
    compressor = cctx.compressobj(size=raw_length)
    for _ in range(raw_length // len(piece)):
        parts.append(compressor.compress(piece))
    parts.append(compressor.flush())
    return b"".join(parts) + tail


def bomb_checkpoint(path: Path, raw_length: int, tail: bytes = b"", group: int = 1) -> Path:
    frame = zstd_bomb(raw_length, tail)
    codecs = ([{"id": "bytegroup", "size": group}] if group > 1 else []) + ZSTD
    chunk = ChunkEntry(DATA, 0, len(frame), 0, raw_length, codecs, zlib.crc32(frame))
    return write_checkpoint(path, one_tensor_manifest(1, raw_length, chunk), frame)


def sealed_body(manifest: Manifest, metadata: bytes) -> bytes:
    """``manifest`` with its metadata replaced by raw JSON bytes, sealed."""
    raw = manifest.to_json()
    body = raw[: raw.rindex(b',"crc32":')] + b"}"
    assert body.count(b'"metadata":{}') == 1
    return seal_manifest(body.replace(b'"metadata":{}', b'"metadata":' + metadata))


def small_checkpoint(root: Path, step: int = 1, **kwargs) -> Path:
    kwargs.setdefault("keep_last", None)
    with CheckpointManager(root, **kwargs) as mgr:
        return mgr.save(step, {"w": torch.arange(1000, dtype=torch.float32), "step": step}).wait()


# ---- stored bytes bounded by what the manifest declares ----------------------------------------


def test_a_stored_chunk_larger_than_its_compression_bound_is_refused_cheaply(tmp_path):
    path = sparse_stored_chunk(tmp_path / "step-000000000002")
    assert (path / DATA).stat().st_blocks * 512 < MiB  # 2 GiB on paper, nothing on disk
    with pytest.raises(CheckpointDamagedError, match=r"chunks\[0\].*stores 2147483648 bytes, more than a zstd frame"):
        read_manifest(path)
    out = in_child(f"asyncckpt.load({str(path)!r})")
    assert out["error"] == "CheckpointDamagedError", out
    assert out["peak"] < HEADROOM, out  # 128 bytes of tensors declared


def test_load_of_a_root_falls_back_when_the_newest_would_exhaust_memory(tmp_path):
    small_checkpoint(tmp_path, step=1)
    sparse_stored_chunk(tmp_path / "step-000000000002")
    # under an address-space limit far below the 2 GiB the newest claims: a MemoryError, if it read it
    out = in_child(f"result = asyncckpt.load({str(tmp_path)!r})['step']", address_space=1 * GiB)
    assert out.get("result") == 1, out
    assert any("step-000000000002" in w for w in out["warnings"]), out


def test_a_memory_error_while_reading_the_newest_falls_back_like_damage(tmp_path):
    small_checkpoint(tmp_path, step=1)
    newest = small_checkpoint(tmp_path, step=2)
    # a manifest within the caps (1.9M short strings, 9 MiB) whose parse needs ~140 MB
    strings = b'"ab",' * 1_900_000
    (newest / MANIFEST_NAME).write_bytes(sealed_body(read_manifest(newest), b'{"x":[' + strings + b'"ab"]}'))
    out = in_child(f"result = asyncckpt.load({str(tmp_path)!r})['step']", address_space=64 * MiB)
    assert out.get("result") == 1, out
    assert any("MemoryError" in w and "step-000000000002" in w for w in out["warnings"]), out


@pytest.mark.parametrize(
    ("raw_length", "group"), [(1 * GiB, 1), (512 * MiB, 4)], ids=["zstd-1GiB", "bytegroup-zstd-512MiB"]
)
def test_a_zstd_bomb_decompresses_once_into_the_tensor_then_trailing_bytes_are_refused(tmp_path, raw_length, group):
    path = bomb_checkpoint(tmp_path / "step-000000000001", raw_length, tail=b"\x00", group=group)
    assert (path / DATA).stat().st_size < 256 * 1024
    out = in_child(f"asyncckpt.load({str(path)!r})", address_space=raw_length + 3 * GiB)
    assert out["error"] == "CheckpointDamagedError", out
    assert "1 bytes after the end of its zstd frame" in out["message"], out
    assert out["peak"] < raw_length + HEADROOM, out  # one copy: the tensor itself


def test_a_zstd_bomb_of_the_declared_size_loads_with_one_copy(tmp_path):
    path = bomb_checkpoint(tmp_path / "step-000000000001", 1 * GiB)
    # a strided sample: t.any() over all of t may build a 256 MiB temporary, which is the test's, not the load's
    code = f"t = asyncckpt.load({str(path)!r})['w']; result = [t.numel(), bool(t[::1024].any())]"
    out = in_child(code, address_space=4 * GiB)
    assert out.get("result") == [GiB // 4, False], out
    assert out["peak"] < GiB + HEADROOM, out


def test_verify_of_a_zstd_bomb_holds_no_chunk_in_memory(tmp_path):
    path = bomb_checkpoint(tmp_path / "step-000000000001", 1 * GiB)
    out = in_child(f"result = verify(Path({str(path)!r})).step", address_space=2 * GiB)
    assert out.get("result") == 1, out
    assert out["peak"] < HEADROOM, out  # verify decodes into nothing: no tensor is returned


def test_zstd_windows_in_flight_share_one_budget_whatever_the_thread_count(tmp_path):
    # 8 chunks whose frames each ask for a 64 MiB window (byte-grouped: decoded through pieces, so
    # zstd buffers its window); 8 reading threads would hold 512 MiB of windows without the budget
    raw_length, n = 64 * MiB, 8
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=27, write_content_size=True)
    frame = zstandard.ZstdCompressor(compression_params=params).compress(os.urandom(1024) * (raw_length // 1024))
    assert zstandard.get_frame_parameters(frame).window_size == raw_length
    codecs = [{"id": "bytegroup", "size": 4}, *ZSTD]
    chunks = [
        ChunkEntry(DATA, i * len(frame), len(frame), i * raw_length, raw_length, codecs, zlib.crc32(frame))
        for i in range(n)
    ]
    manifest = dataclasses.replace(
        one_tensor_manifest(1, n * raw_length, chunks[0]), chunks=chunks, stored_bytes=n * len(frame)
    )
    path = write_checkpoint(tmp_path / "step-000000000001", manifest, frame * n)
    read = "from asyncckpt.engine.reader import read_checkpoint\n"
    out = in_child(read + f"result = len(read_checkpoint(Path({str(path)!r}), workers=8).tensors)")
    assert out.get("result") == 1, out
    assert out["peak"] < n * raw_length + HEADROOM, out
    out = in_child(f"result = verify(Path({str(path)!r}), workers=8).step")
    assert out.get("result") == 1, out
    assert out["peak"] < HEADROOM, out


# ---- manifest parse cost -----------------------------------------------------------------------


def test_a_manifest_of_millions_of_empty_dicts_is_refused_before_parsing(tmp_path):
    path = small_checkpoint(tmp_path)
    manifest = read_manifest(path)
    n = 20_000_000  # 60 MiB of {},
    (path / MANIFEST_NAME).write_bytes(sealed_body(manifest, b'{"x":[' + b"{}," * n + b"{}]}"))
    with pytest.raises(CheckpointDamagedError, match="JSON values: exceeds the reader.s limit"):
        read_manifest(path)
    out = in_child(
        f"import io, contextlib\nwith contextlib.redirect_stdout(io.StringIO()):\n"
        f"    from asyncckpt.cli.commands import main\n    result = main(['ls', {str(tmp_path)!r}])"
    )
    assert out.get("result") == 0, out
    assert out["peak"] < HEADROOM, out  # was 1.7 GB and 18 s


def test_a_manifest_nested_a_million_levels_deep_is_invalid_json_not_a_crash(tmp_path):
    path = small_checkpoint(tmp_path)
    depth = 1_000_000
    (path / MANIFEST_NAME).write_bytes(sealed_body(read_manifest(path), b"[" * depth + b"]" * depth))
    with pytest.raises(CheckpointDamagedError, match="not valid JSON"):
        read_manifest(path)


def test_a_manifest_over_the_size_cap_is_refused_without_reading_it(tmp_path):
    path = small_checkpoint(tmp_path)
    with open(path / MANIFEST_NAME, "r+b") as f:
        f.truncate(65 * MiB)  # sparse
    with pytest.raises(CheckpointDamagedError, match="exceeds the reader.s limit of"):
        read_manifest(path)


# ---- duplicate keys and trailing bytes (both verified before) ----------------------------------


def test_a_dict_node_holding_one_key_twice_is_invalid(tmp_path):
    path = small_checkpoint(tmp_path)
    manifest = read_manifest(path)
    pairs = manifest.tree["d"]
    tree = {"d": [*pairs, ["w", pairs[0][1]]]}  # 'w' again, pointing at the same tensor
    (path / MANIFEST_NAME).write_bytes(dataclasses.replace(manifest, tree=tree).to_json())
    with pytest.raises(CheckpointDamagedError, match="duplicate key 'w' in a dict node"):
        verify_checkpoint(path)
    assert cli_main(["verify", str(path)]) == 1


def test_duplicate_json_keys_in_a_sealed_manifest_are_invalid(tmp_path):
    path = small_checkpoint(tmp_path)
    raw = (path / MANIFEST_NAME).read_bytes()
    body = raw[: raw.rindex(b',"crc32":')] + b"}"
    body = body[:-1] + b',"tags":["x"]}'  # a second "tags"
    (path / MANIFEST_NAME).write_bytes(seal_manifest(body))
    with pytest.raises(CheckpointDamagedError, match="duplicate key 'tags'"):
        verify_checkpoint(path)


def _skippable(payload: bytes) -> bytes:
    return (0x184D2A50).to_bytes(4, "little") + len(payload).to_bytes(4, "little") + payload


TAILS = {
    "one-zero-byte": b"\x00",
    "garbage": b"definitely not zstd",
    "half-a-magic": b"\x28\xb5",
    "skippable-frame": _skippable(b"hidden"),
    "second-frame": zstandard.ZstdCompressor(write_content_size=True).compress(b"more"),
}


@pytest.mark.parametrize("tail", TAILS.values(), ids=TAILS.keys())
@pytest.mark.parametrize("group", [1, 4], ids=["zstd", "bytegroup-zstd"])
def test_bytes_after_the_end_of_a_zstd_frame_are_damage(tmp_path, tail, group):
    raw_length = 64 * 1024
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(raw_length))
    stored = frame + tail
    codecs = ([{"id": "bytegroup", "size": group}] if group > 1 else []) + ZSTD
    chunk = ChunkEntry(DATA, 0, len(stored), 0, raw_length, codecs, zlib.crc32(stored))
    path = write_checkpoint(tmp_path / "step-000000000001", one_tensor_manifest(1, raw_length, chunk), stored)
    message = f"holds {len(tail)} bytes after the end of its zstd frame"
    with pytest.raises(CheckpointDamagedError, match=message):
        verify_checkpoint(path)
    with pytest.raises(CheckpointDamagedError, match=message):
        asyncckpt.load(path)
    # control: without the tail the same chunk loads
    ok = ChunkEntry(DATA, 0, len(frame), 0, raw_length, codecs, zlib.crc32(frame))
    write_checkpoint(path, one_tensor_manifest(1, raw_length, ok), frame)
    assert not asyncckpt.load(path)["w"].any()


def test_a_chain_of_empty_zstd_blocks_is_refused_after_a_bounded_walk(tmp_path):
    # a valid frame header declaring 4096 bytes, then a million empty raw blocks (3 zero bytes each)
    raw_length = 4096
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(raw_length))
    header = frame[: zstandard.frame_header_size(frame)]
    stored = header + bytes(3 * 1_000_000) + frame[len(header) :]
    chunk = ChunkEntry(DATA, 0, len(stored), 0, raw_length, ZSTD, zlib.crc32(stored))
    with pytest.raises(CheckpointDamagedError, match="stores .* more than a zstd frame"):
        write_checkpoint(tmp_path / "a" / "step-000000000001", one_tensor_manifest(1, raw_length, chunk), stored)
        read_manifest(tmp_path / "a" / "step-000000000001")
    # within the compression bound of a larger chunk, the walk stops at its block budget
    raw_length = 1 << 20
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(raw_length))
    header = frame[: zstandard.frame_header_size(frame)]
    stored = header + bytes(3 * 300_000) + frame[len(header) :]
    chunk = ChunkEntry(DATA, 0, len(stored), 0, raw_length, ZSTD, zlib.crc32(stored))
    path = write_checkpoint(tmp_path / "b" / "step-000000000001", one_tensor_manifest(1, raw_length, chunk), stored)
    with pytest.raises(CheckpointDamagedError, match="bad zstd frame in chunk 0: more than 2304 blocks"):
        verify_checkpoint(path)


# ---- error types and tensor names --------------------------------------------------------------


def test_reader_errors_say_not_found_or_damaged_by_type(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        asyncckpt.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint in"):
        asyncckpt.load(tmp_path / "empty")
    root = tmp_path / "root"
    path = small_checkpoint(root, compression=None)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint for step 5"):
        asyncckpt.load(root, step=5)
    data = bytearray((path / DATA).read_bytes())
    data[100] ^= 1
    (path / DATA).write_bytes(bytes(data))
    with pytest.raises(CheckpointDamagedError, match="checksum mismatch"):
        asyncckpt.load(path)
    with pytest.raises(CheckpointDamagedError, match="no valid checkpoint"), pytest.warns(UserWarning):
        asyncckpt.load(root)
    os.truncate(path / DATA, 64)
    with pytest.raises(CheckpointDamagedError, match="is truncated"):
        read_checkpoint(path)
    (path / MANIFEST_NAME).write_bytes(b"{}")
    with pytest.raises(CheckpointDamagedError, match="invalid manifest"):
        read_manifest(path)
    (path / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointDamagedError, match="no manifest.json"):
        read_manifest(path)


def test_damage_names_the_tensor_by_its_path_in_the_state(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    with CheckpointManager(tmp_path, compression=None, chunk_size=4096) as mgr:
        path = mgr.save(1, {"model": model, "step": 1}).wait()
    manifest = read_manifest(path)
    weight = next(t for t in manifest.tensors if tuple(t.shape) == (64, 64))
    data = bytearray((path / DATA).read_bytes())
    data[weight.offset + 10] ^= 1
    (path / DATA).write_bytes(bytes(data))
    name = "state['model'].state_dict()['0.weight'] float32[64, 64]"
    with pytest.raises(CheckpointDamagedError) as info:
        asyncckpt.load(path)
    assert name in str(info.value) and "#" not in str(info.value)
    assert cli_main(["verify", str(tmp_path)]) == 1
    assert name in capsys.readouterr().out
