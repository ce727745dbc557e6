"""The reader: the zero-copy load of raw checkpoints (with mmap=True, compression=None data files
are mapped, not read), and reads into memory the caller names.

Zero-copy is checked through /proc/self/maps: every loaded tensor's memory lies inside one private
mapping of the checkpoint's data file, at the tensor's offset in that file. The read path is
detected by the per-tensor buffers it allocates (``reader._Scatter``).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
from pathlib import Path

import pytest
import torch

import asyncckpt
from _trees import assert_same_tree, same_tensor
from asyncckpt import CheckpointError, CheckpointManager
from asyncckpt.engine import reader
from asyncckpt.engine.reader import read_checkpoint, read_manifest
from asyncckpt.state.skeleton import tensor_paths

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")

DATA = "data-00000.bin"


# ---- helpers ---------------------------------------------------------------------------------


def mixed_state(seed: int = 0) -> dict:
    """Random bit patterns in several dtypes (several dtype groups and chunks), plus odd sizes."""
    gen = torch.Generator().manual_seed(seed)

    def rand(dtype: torch.dtype, *shape: int) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
        return (raw & 1).bool().view(shape) if dtype == torch.bool else raw.view(dtype).view(shape)

    return {
        "w": rand(torch.float32, 300, 257),  # > 4096-byte chunks: several chunks per tensor
        "b": rand(torch.float32, 257),
        "h": rand(torch.bfloat16, 33, 7),
        "i": rand(torch.int64, 1000),
        "m": rand(torch.bool, 77),
        "empty": torch.empty(0, 5),
        "nested": [rand(torch.float16, 3), {"x": rand(torch.uint8, 5)}],
        "step": 7,
    }


def save(root: Path, state: dict, step: int = 1, **kwargs) -> Path:
    kwargs.setdefault("compression", None)
    with CheckpointManager(root, chunk_size=4096, **kwargs) as mgr:
        return mgr.save(step, state).wait()


def tensors_of(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors_of(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors_of(v)]
    return []


def mapping_of(address: int) -> tuple[int, int, int, str] | None:
    """(start, end, inode, name) of the mapping of this process that holds ``address``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return start, end, int(fields[4]), fields[5].strip() if len(fields) > 5 else ""
    return None


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_read_path(monkeypatch):
    """Fail the test if the read path (which allocates per-tensor buffers) is taken."""

    def refuse(*args, **kwargs):
        raise AssertionError("the read path was taken instead of the mapping")

    monkeypatch.setattr(reader, "_Scatter", refuse)


@pytest.fixture
def count_reads(monkeypatch):
    """Count how often the read path is taken."""
    calls = []
    real = reader._Scatter

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reader, "_Scatter", counting)
    return calls


# ---- the mapped path -------------------------------------------------------------------------


def test_raw_checkpoint_loads_bit_exact_as_views_of_one_file_mapping(tmp_path, no_read_path):
    state = mixed_state()
    path = save(tmp_path, state)
    data = path / DATA
    loaded = asyncckpt.load(tmp_path, mmap=True)
    assert_same_tree(state, loaded)
    assert loaded["step"] == 7

    manifest = read_manifest(path)
    size, inode = data.stat().st_size, data.stat().st_ino
    assert size == manifest.raw_bytes  # raw chunks at their logical offsets: the arena, byte for byte
    regions = set()
    for i, t in enumerate(tensors_of(loaded)):
        if t.numel() == 0:
            continue
        found = mapping_of(t.untyped_storage().data_ptr())
        assert found is not None
        start, end, ino, name = found
        assert ino == inode and name == str(data), f"tensor {i} is not in a mapping of {data}: {found}"
        assert end - start == -(-size // mmap.PAGESIZE) * mmap.PAGESIZE  # the whole file, once
        regions.add((start, end))
    assert len(regions) == 1
    (start, _), entries = regions.pop(), [e for e in manifest.tensors if e.nbytes]
    by_offset = sorted(t.data_ptr() - start for t in tensors_of(loaded) if t.numel())
    assert by_offset == sorted(e.offset for e in entries)  # each tensor sits at its file offset


def test_each_mapped_tensor_owns_a_storage_of_its_own_bytes(tmp_path, no_read_path):
    state = mixed_state()
    loaded = read_checkpoint(save(tmp_path, state), mmap=True)
    assert loaded.mapped
    for t, entry in zip(loaded.tensors, loaded.manifest.tensors, strict=True):
        assert t.untyped_storage().nbytes() == entry.nbytes  # torch.save of one tensor saves only it


def test_writing_into_a_loaded_tensor_never_reaches_the_file(tmp_path, no_read_path):
    state = mixed_state()
    path = save(tmp_path, state)
    before = file_digest(path / DATA)
    loaded = asyncckpt.load(path, mmap=True)
    loaded["w"].fill_(1.5)
    loaded["i"].add_(3)
    loaded["nested"][1]["x"].zero_()
    assert (loaded["w"] == 1.5).all()
    assert file_digest(path / DATA) == before
    assert_same_tree(state, asyncckpt.load(path, mmap=True))  # a fresh load still sees the saved bytes


def test_flipped_byte_in_a_mapped_file_is_a_checksum_error(tmp_path, no_read_path):
    path = save(tmp_path, mixed_state())
    data = path / DATA
    offset = read_manifest(path).tensors[0].offset + 12345
    raw = bytearray(data.read_bytes())
    raw[offset] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checksum mismatch in chunk \d+.*float32\[300, 257\]") as info:
        asyncckpt.load(path, mmap=True)
    assert str(data) in str(info.value)


@pytest.mark.parametrize("cut", [1, 64, 4096 + 7])
def test_truncated_raw_data_file_is_an_error_not_a_crash(tmp_path, cut):
    path = save(tmp_path, mixed_state())
    data = path / DATA
    os.truncate(data, data.stat().st_size - cut)
    with pytest.raises(CheckpointError, match="is truncated") as info:
        asyncckpt.load(path)
    assert str(data) in str(info.value)
    with pytest.raises(CheckpointError, match="no valid checkpoint"), pytest.warns(UserWarning, match="truncated"):
        asyncckpt.load(tmp_path)  # the root: every candidate is damaged


def test_symlinked_data_file_is_refused(tmp_path):
    path = save(tmp_path / "ckpt", mixed_state())
    outside = tmp_path / "outside.bin"
    (path / DATA).rename(outside)
    (path / DATA).symlink_to(outside)
    with pytest.raises(CheckpointError, match="symbolic link"):
        asyncckpt.load(path)


def test_restore_from_a_raw_checkpoint_is_bit_exact(tmp_path, make_training, monkeypatch):
    setup = make_training(init_seed=0, total_steps=6)
    for step in range(3):
        setup.train_step(step)
    setup.state["step"] = 3
    setup.state["rng"] = torch.get_rng_state()
    with CheckpointManager(tmp_path, compression=None) as mgr:
        mgr.save(3, setup.state).wait()
    expected_model = {k: v.clone() for k, v in setup.model.state_dict().items()}
    expected_opt = [t.clone() for t in tensors_of(setup.optimizer.state_dict()["state"])]

    mapped = []
    real = reader._map_raw
    monkeypatch.setattr(reader, "_map_raw", lambda *a: mapped.append(real(*a)) or mapped[-1])
    fresh = make_training(init_seed=1, total_steps=6)
    with CheckpointManager(tmp_path, compression=None) as mgr:
        assert mgr.restore(fresh.state) == 3
    assert not mapped  # restore reads into memory of its own, never through a mapping
    assert fresh.state["step"] == 3
    for name, tensor in fresh.model.state_dict().items():
        assert same_tensor(expected_model[name], tensor), name
    got_opt = tensors_of(fresh.optimizer.state_dict()["state"])
    assert len(got_opt) == len(expected_opt)
    for e, g in zip(expected_opt, got_opt, strict=True):
        assert same_tensor(e, g)
    # both continue identically from the saved RNG state
    assert same_tensor(setup.state["rng"], fresh.state["rng"])
    torch.set_rng_state(setup.state["rng"])
    expected_loss = setup.train_step(3)
    torch.set_rng_state(fresh.state["rng"])
    assert torch.equal(expected_loss, fresh.train_step(3))


def test_load_weights_reads_only_the_model_chunks(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.Linear(50, 3))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 40)).sum().backward()
    opt.step()
    save(tmp_path, {"model": model, "optimizer": opt})
    verified = []
    from asyncckpt.codec import source

    real_crc = source.crc32  # every stored byte a load verifies goes through a ChunkSource
    monkeypatch.setattr(source, "crc32", lambda data, value=0: verified.append(len(data)) or real_crc(data, value))
    target = torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.Linear(50, 3))
    assert asyncckpt.load_weights(tmp_path, target) == 1
    for a, b in zip(model.state_dict().values(), target.state_dict().values(), strict=True):
        assert same_tensor(a, b)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert model_bytes <= sum(verified) < 2 * model_bytes  # the optimizer's chunks were skipped


# ---- the read path ---------------------------------------------------------------------------


def test_compressed_checkpoint_takes_the_read_path(tmp_path, count_reads):
    state = {"zeros": torch.zeros(40000), "ramp": torch.arange(20000, dtype=torch.int64) // 100}
    path = save(tmp_path, state, compression="zstd")
    assert all(c.codecs for c in read_manifest(path).chunks)
    loaded = read_checkpoint(path)
    assert not loaded.mapped and count_reads == [1]
    data = path / DATA
    for t in loaded.tensors:
        found = mapping_of(t.untyped_storage().data_ptr())
        assert found is None or found[2] != data.stat().st_ino
    assert_same_tree(state, asyncckpt.load(path))


def test_partly_compressed_checkpoint_takes_the_read_path(tmp_path, count_reads):
    # zeros compress, random bytes do not (stored raw): the raw chunks sit off their logical offsets
    state = {"zeros": torch.zeros(20000), **mixed_state()}
    path = save(tmp_path, state, compression="zstd")
    chunks = read_manifest(path).chunks
    assert any(c.codecs for c in chunks) and any(not c.codecs for c in chunks)
    assert_same_tree(state, asyncckpt.load(path))
    assert count_reads == [1]


def test_the_read_path_is_the_default(tmp_path, count_reads):
    state = mixed_state()
    path = save(tmp_path, state)
    loaded = read_checkpoint(path)
    assert not loaded.mapped and count_reads == [1]
    mapped = read_checkpoint(path, mmap=True)
    assert mapped.mapped and count_reads == [1]
    for a, b in zip(loaded.tensors, mapped.tensors, strict=True):
        assert same_tensor(a, b)


# ---- the default load is private memory ------------------------------------------------------

_REWRITE_AFTER_LOAD = r"""
import os, sys, torch, asyncckpt
from pathlib import Path
root = Path(sys.argv[1])
data = next(root.glob("step-*")) / "data-00000.bin"
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
state = {"model": model, "step": 0}
loaded = asyncckpt.load(root)["model"]
mgr = asyncckpt.CheckpointManager(root)
mgr.restore(state)
mgr.close()
weights_model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
asyncckpt.load_weights(root, weights_model)
before = [t.clone() for t in (*loaded.values(), *model.state_dict().values(), *weights_model.state_dict().values())]
size = data.stat().st_size
with open(data, "r+b") as f:  # rewritten in place, then truncated
    f.write(b"\xff" * size)
    f.flush()
    os.fsync(f.fileno())
    f.truncate(0)
after = [*loaded.values(), *model.state_dict().values(), *weights_model.state_dict().values()]
print(sum(bool(torch.equal(a, b)) for a, b in zip(before, after)), len(before))
"""


def test_default_load_restore_and_load_weights_are_immune_to_the_file_changing(tmp_path):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    with CheckpointManager(tmp_path, compression=None) as mgr:
        mgr.save(1, {"model": model, "step": 1}).wait()
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _REWRITE_AFTER_LOAD, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"exit {done.returncode} (SIGBUS is -7): {done.stderr[-2000:]}"
    equal, total = map(int, done.stdout.split())
    assert total == 12 and equal == total  # 4 tensors each from load, restore and load_weights


def test_overlapping_ranges_of_a_partial_read_each_get_all_their_bytes(tmp_path):
    """A reshard reads rows of stored pieces as ranges of the byte space, and two boxes may want
    overlapping rows: a chunk after the start of a short range but inside an earlier, longer one
    was skipped, leaving that range's bytes uninitialized."""
    import dataclasses

    from asyncckpt.format import TensorEntry

    data = torch.arange(10_000, dtype=torch.float32)
    with CheckpointManager(tmp_path, chunk_size=4096) as mgr:
        mgr.save(1, {"x": data}).wait()
    path = tmp_path / "step-000000000001"
    manifest = read_manifest(path)
    (entry,) = manifest.tensors
    spans = [(0, 40_000), (8_000, 12_000), (0, 40_000)]
    ranges = [TensorEntry("uint8", (b - a,), entry.offset + a, b - a) for a, b in spans]
    synthetic = dataclasses.replace(manifest, tensors=ranges, tree={"d": []})
    loaded = read_checkpoint(path, manifest=synthetic, only={0, 1, 2})
    raw = data.view(torch.uint8)
    for (a, b), got in zip(spans, loaded.tensors, strict=True):
        assert torch.equal(got, raw[a:b]), (a, b)


# ---- decoding into the caller's memory -------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_destinations_receive_their_tensors_bytes_and_are_returned_as_views(tmp_path, compression):
    """``into`` names where a tensor's bytes go: slices of one buffer, as a consolidated load
    fills the rows of a whole tensor from several ranks. Chunks holding several tensors (decoded
    through a scratch buffer) and chunks of one tensor (decoded straight in) both land there."""
    state = mixed_state()
    path = save(tmp_path, state, compression=compression)
    manifest = read_manifest(path)
    index = {name: i for i, name in tensor_paths(manifest.tree).items()}
    w, b, h = index["state['w']"], index["state['b']"], index["state['h']"]
    sizes = [manifest.tensors[i].nbytes for i in (w, b, h)]
    block = torch.full((sum(sizes) + 8,), 0xA5, dtype=torch.uint8)  # 8 bytes after: never written
    into, at = {}, 0
    for i, n in zip((w, b, h), sizes, strict=True):
        into[i] = block[at : at + n]
        at += n
    loaded = read_checkpoint(path, manifest=manifest, into=into)
    for i, key in ((w, "w"), (b, "b"), (h, "h")):
        assert same_tensor(loaded.tensors[i], state[key])
        assert loaded.tensors[i].untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
        assert torch.equal(into[i], state[key].reshape(-1).view(torch.uint8))
    assert block[at:].tolist() == [0xA5] * 8
    i = index["state['i']"]
    assert same_tensor(loaded.tensors[i], state["i"])  # the others get memory of their own
    assert loaded.tensors[i].untyped_storage().data_ptr() != block.untyped_storage().data_ptr()


def test_destinations_that_do_not_fit_are_refused(tmp_path):
    """A caller's bug, named as one (TypeError: a load never takes it for damage and falls back)."""
    state = {"h": torch.ones(3, dtype=torch.bfloat16), "w": torch.ones(5)}
    path = save(tmp_path, state, compression="zstd")
    manifest = read_manifest(path)
    h, w = (i for _, i in sorted((p, i) for i, p in tensor_paths(manifest.tree).items()))
    n = manifest.tensors[w].nbytes
    right = torch.empty(n, dtype=torch.uint8)
    for into, needle in (
        ({w: torch.empty(n - 1, dtype=torch.uint8)}, f"not {n} contiguous bytes"),
        ({w: torch.empty(n * 2, dtype=torch.uint8)[::2]}, f"not {n} contiguous bytes"),
        ({w: torch.empty(n // 4, dtype=torch.float32)}, "flat uint8 buffer"),
        ({w: right.view(1, -1)}, "flat uint8 buffer"),
        ({w: torch.empty(n + 2, dtype=torch.uint8)[2:]}, "multiple of its element size"),
        ({-1: right}, "not a wanted tensor"),
        ({len(manifest.tensors): right}, "not a wanted tensor"),
    ):
        with pytest.raises(TypeError, match=needle):
            read_checkpoint(path, manifest=manifest, into=into)
    with pytest.raises(TypeError, match="not a wanted tensor"):
        read_checkpoint(path, manifest=manifest, only={h}, into={w: right})
    with pytest.raises(TypeError, match="not with mmap"):
        read_checkpoint(path, manifest=manifest, mmap=True, into={w: right})
    ok = read_checkpoint(path, manifest=manifest, into={w: torch.empty(n + 4, dtype=torch.uint8)[4:]})
    assert same_tensor(ok.tensors[w], state["w"]) and same_tensor(ok.tensors[h], state["h"])
