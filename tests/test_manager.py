"""End-to-end tests of CheckpointManager, asyncckpt.load and restore."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

import asyncckpt
import asyncckpt.codec
from _trees import assert_same_tree, same_tensor
from _waiting import run_with_timeout, wait_until
from asyncckpt import CheckpointError, CheckpointManager, EverySteps
from asyncckpt.format import DTYPES
from asyncckpt.storage.local import DataFileWriter, LocalBackend

MiB = 1 << 20

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")


# ---- helpers ---------------------------------------------------------------------------------


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of any dtype (valid 0/1 for bool)."""
    n = math.prod(shape)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw & 1).bool().view(shape)
    return raw.view(dtype).view(shape)


def blank_like(tree):
    """The same structure with every tensor/array replaced by a fresh 0x5A-filled one (same strides)."""
    if isinstance(tree, torch.Tensor):
        out = torch.empty_strided(tree.size(), tree.stride(), dtype=tree.dtype)
        out.untyped_storage().fill_(0x5A)
        return out
    if isinstance(tree, np.ndarray):
        return np.zeros_like(tree)
    if isinstance(tree, Mapping):
        return {k: blank_like(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [blank_like(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(blank_like(v) for v in tree)
    return "stale"


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".replaced-")))


def step_dirs(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in root.iterdir() if p.name.startswith("step-"))


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:012d}"


def manifest_of(root: Path, step: int) -> dict:
    return json.loads((step_dir(root, step) / "manifest.json").read_bytes())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def randn_state(seed: int, n: int = 200_000) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(n, generator=g),
        "ids": torch.randint(0, 1000, (5000,), generator=g),
        "meta": {"seed": seed},
    }


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def managers():
    """Factory for managers that are closed (quietly) when the test ends, whatever happened."""
    opened: list[CheckpointManager] = []

    def make(root, **kwargs) -> CheckpointManager:
        mgr = CheckpointManager(root, **kwargs)
        opened.append(mgr)
        return mgr

    yield make
    for mgr in opened:
        try:
            mgr.close()
        except CheckpointError:
            pass


@pytest.fixture
def gate(managers, monkeypatch):
    """Block the background writer at its first data append until the returned Event is set.

    Depends on ``managers`` so it is released before those managers are closed at teardown.
    """
    event = threading.Event()
    original = DataFileWriter.append

    def gated_append(self, data):
        assert event.wait(60), "test gate was never opened"
        return original(self, data)

    monkeypatch.setattr(DataFileWriter, "append", gated_append)
    yield event
    event.set()


# ---- round trips -----------------------------------------------------------------------------


def rich_state() -> dict:
    gen = torch.Generator().manual_seed(7)
    per_dtype = {}
    for name, dtype in DTYPES.items():
        base = random_tensor(dtype, (6, 10), gen)
        per_dtype[name] = {
            "zero_dim": random_tensor(dtype, (7,), gen)[3],
            "empty": random_tensor(dtype, (0, 3), gen),
            "vector": random_tensor(dtype, (33,), gen),
            "strided": base[1:, 1::3],  # non-contiguous, with a storage offset
            "transposed": random_tensor(dtype, (5, 4), gen).t(),
        }
    big = {
        # each > 4 MiB, so each spans more than one default-size chunk
        "f32": torch.randn((5 * MiB) // 4 + 17, generator=gen),
        "bf16": torch.randn(5 * MiB // 2 + 3, generator=gen).to(torch.bfloat16),
        "i64_transposed": torch.randint(-(2**40), 2**40, (700, 1000), generator=gen).t(),
        "u8_random": random_tensor(torch.uint8, (4 * MiB + 1,), gen),  # incompressible
    }
    array = np.arange(24, dtype=np.float32).reshape(4, 6)
    return {
        "dtypes": per_dtype,
        "big": big,
        "nested": {
            0: {"a": [1, 2.5, None, "s", True]},
            7: (torch.arange(5), "x", (1, (2, [3]))),
            -3: [],
            "0": "str key next to an int key",
            2**70: {},
        },
        "scalars": {
            "int": 2**62,
            "huge_int": -(2**100),
            "float": 0.1,
            "neg_zero": -0.0,
            "inf": float("-inf"),
            "nan": float("nan"),
            "none": None,
            "true": True,
            "false": False,
            "str": 'héllo ✓ \x00 "quoted" \n',
            "empty_str": "",
            "empty_tuple": (),
            "empty_list": [],
            "empty_dict": {},
        },
        "numpy": {
            "array": array,
            "strided": array[:, ::2],
            "int16": np.arange(-5, 5, dtype=np.int16),
            "bool": np.array([True, False, True]),
            "complex": np.array([1 + 2j, -3.5j], dtype=np.complex64),
            "zero_dim": np.array(2.75),
            "f64_scalar": np.float64(3.25),
            "i32_scalar": np.int32(-7),
            "bool_scalar": np.bool_(True),
        },
        "dtype_leaf": torch.float16,
        "device_leaf": torch.device("cpu"),
        "list": [torch.ones(2, 2), [torch.zeros(1)], {"k": 1}],
    }


@pytest.mark.parametrize("compression", ["zstd", None])
def test_round_trip_is_bit_exact_through_load_and_restore(tmp_path, managers, compression):
    state = rich_state()
    root = tmp_path / "ckpts"
    mgr = managers(root, compression=compression)
    path = mgr.save(3, state).wait()
    assert path == step_dir(root, 3)
    assert mgr.steps() == [3]

    loaded = asyncckpt.load(root)
    assert_same_tree(state, loaded)
    assert_same_tree(state, asyncckpt.load(root, step=3))
    assert_same_tree(state, asyncckpt.load(path))  # a checkpoint dir works too

    big_chunks = [c for c in manifest_of(root, 3)["chunks"] if c["raw_length"] > 1 * MiB]
    assert len(big_chunks) > 4  # the big tensors really were split into several chunks
    if compression is None:
        assert all(c["codecs"] == [] for c in manifest_of(root, 3)["chunks"])

    live = blank_like(state)
    in_place = [live["dtypes"]["float32"]["strided"], live["big"]["f32"], live["list"][0]]
    assert mgr.restore(live) == 3
    assert_same_tree(state, live)
    # tensors are restored into the live tensors, not replaced
    assert live["dtypes"]["float32"]["strided"] is in_place[0]
    assert live["big"]["f32"] is in_place[1]
    assert live["list"][0] is in_place[2]


def test_consecutive_saves_keep_each_value_exactly_while_the_model_s_skeleton_repeats(tmp_path, managers):
    """Saves reuse the last save's skeleton where it holds the same: values that Python finds
    equal (1, 1.0, True; 0.0, -0.0) are each stored as given, and a model changed between saves
    is stored as it is now."""
    model = torch.nn.Linear(3, 2)
    mgr = managers(tmp_path / "ckpts", keep_last=None)
    values = [1, 1.0, True, 1, 0.0, -0.0, 0.0, False]
    for step, value in enumerate(values):
        if step == 4:
            model.weight.data = torch.ones(5, 3)  # a new shape: a new layout and skeleton
            model.bias.data = torch.zeros(5)
        mgr.save(step, {"model": model, "value": value, "nested": [{"value": value}]}).wait()
    for step, value in enumerate(values):
        loaded = asyncckpt.load(tmp_path / "ckpts", step=step)
        for got in (loaded["value"], loaded["nested"][0]["value"]):
            assert type(got) is type(value) and got == value, (step, value, got)
            if isinstance(value, float):
                assert math.copysign(1.0, got) == math.copysign(1.0, value), (step, value, got)
        assert loaded["model"]["weight"].shape == ((2, 3) if step < 4 else (5, 3))


def test_small_chunks_and_packed_small_tensors(tmp_path, managers):
    gen = torch.Generator().manual_seed(3)
    state = {f"t{i}": random_tensor(list(DTYPES.values())[i % len(DTYPES)], (i * 7 + 1,), gen) for i in range(60)}
    state["long"] = torch.randn(50_000, generator=gen)
    mgr = managers(tmp_path / "ckpts", chunk_size=4096)
    mgr.save(1, state).wait()
    chunks = manifest_of(tmp_path / "ckpts", 1)["chunks"]
    assert len(chunks) > 50
    assert max(c["raw_length"] for c in chunks) <= 4096
    assert_same_tree(state, asyncckpt.load(tmp_path / "ckpts"))


def test_conjugate_view_is_not_merged_with_its_base(tmp_path, managers):
    """A conj() view shares storage, offset, shape and stride with its base but holds other values."""
    z = torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    state = {"z": z, "z_conj": z.conj()}
    managers(tmp_path / "ckpts").save(1, state).wait()
    loaded = asyncckpt.load(tmp_path / "ckpts")
    assert torch.equal(loaded["z"], z)
    assert torch.equal(loaded["z_conj"], z.conj().resolve_conj())


def test_negative_stride_numpy_array_is_saved_or_rejected_naming_path(tmp_path, managers):
    """DESIGN 4: an unsupported leaf is 'a clear error at save time' (TypeError naming the path)."""
    reversed_array = np.arange(6.0)[::-1]
    mgr = managers(tmp_path / "ckpts")
    try:
        mgr.save(1, {"arr": reversed_array}).wait()
    except TypeError as exc:
        assert "state['arr']" in str(exc)
    else:
        assert_same_tree({"arr": reversed_array.copy()}, asyncckpt.load(tmp_path / "ckpts"))


# ---- tied weights ----------------------------------------------------------------------------


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(40, 16)
        self.mid = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 40, bias=False)
        self.head.weight = self.emb.weight


def test_tied_weights_are_saved_once_and_stay_tied(tmp_path, managers):
    torch.manual_seed(0)
    model = TiedLM()
    shared = torch.randn(10)
    state = {"model": model, "a": shared, "b": shared}
    root = tmp_path / "ckpts"
    mgr = managers(root)
    mgr.save(1, state).wait()
    # emb.weight == head.weight, mid.weight, mid.bias, and the shared plain tensor
    assert len(manifest_of(root, 1)["tensors"]) == 4

    loaded = asyncckpt.load(root)
    emb, head = loaded["model"]["emb.weight"], loaded["model"]["head.weight"]
    assert emb is head or emb.data_ptr() == head.data_ptr()
    assert loaded["a"] is loaded["b"] or loaded["a"].data_ptr() == loaded["b"].data_ptr()
    assert torch.equal(emb, model.emb.weight.detach())

    torch.manual_seed(1)
    fresh = TiedLM()
    assert not torch.equal(fresh.emb.weight, model.emb.weight)
    fresh_state = {"model": fresh, "a": torch.zeros(10), "b": torch.zeros(10)}
    assert mgr.restore(fresh_state) == 1
    assert fresh.head.weight is fresh.emb.weight
    for name, tensor in model.state_dict().items():
        assert same_tensor(fresh.state_dict()[name], tensor), name
    assert torch.equal(fresh_state["a"], shared) and torch.equal(fresh_state["b"], shared)


# ---- training resume -------------------------------------------------------------------------


@pytest.mark.parametrize("rng", ["tensor", "RNGState"])
def test_resume_continues_bit_identically(tmp_path, managers, make_training, rng):
    """Dropout draws from torch's RNG: it is carried as a plain tensor, or as asyncckpt.RNGState()."""
    if rng == "RNGState" and not hasattr(asyncckpt, "RNGState"):
        pytest.fail("the README names asyncckpt.RNGState(), the package has none")
    total, k = 12, 5
    root = tmp_path / "ckpts"
    run = make_training(0, total)
    if rng == "RNGState":
        run.state["rng"] = asyncckpt.RNGState()
    mgr = managers(root)
    losses = []
    for step in range(total):
        if step == k:
            run.state["step"] = step
            if rng == "tensor":
                run.state["rng"] = torch.get_rng_state()
            run.state["extra"] = {"epoch": 1, "note": "mid-run"}
            mgr.save(step, run.state, metrics={"loss": losses[-1]})
        losses.append(run.train_step(step))
    mgr.close()
    assert run.scaler.get_scale() != 2.0**10  # the scaler's state really changed

    resumed = make_training(123, total)  # different initial weights
    if rng == "RNGState":
        resumed.state["rng"] = asyncckpt.RNGState()
    torch.manual_seed(999)  # and a different global RNG stream
    with CheckpointManager(root) as mgr2:
        start = mgr2.restore(resumed.state)
    assert start == k
    assert resumed.state["step"] == k
    assert resumed.state["extra"] == {"epoch": 1, "note": "mid-run"}
    if rng == "tensor":
        torch.set_rng_state(resumed.state["rng"])
    resumed_losses = [resumed.train_step(step) for step in range(start, total)]

    for step, (a, b) in enumerate(zip(losses[k:], resumed_losses, strict=True), start=k):
        assert same_tensor(a, b), f"loss at step {step}: {a.item()!r} != {b.item()!r}"
    for name, tensor in run.model.state_dict().items():
        assert same_tensor(resumed.model.state_dict()[name], tensor), name
    opt_a, opt_b = run.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, per_param in opt_a["state"].items():
        for key, value in per_param.items():
            assert same_tensor(opt_b["state"][index][key], value), (index, key)
    assert run.scheduler.state_dict() == resumed.scheduler.state_dict()
    assert run.scaler.state_dict() == resumed.scaler.state_dict()


# ---- snapshot semantics and memory ------------------------------------------------------------


def test_snapshot_is_a_copy_taken_before_save_returns(tmp_path, managers, gate):
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 8)
    weights = linear.weight.detach().clone()
    t = torch.arange(1000, dtype=torch.float32)
    mgr = managers(tmp_path / "ckpts")
    handle = mgr.save(1, {"t": t, "model": linear})
    t.add_(1000)  # in place, right after save returned, while the writer has not written a byte
    with torch.no_grad():
        linear.weight.mul_(0)
    assert not handle.done()
    gate.set()
    handle.wait()
    loaded = asyncckpt.load(tmp_path / "ckpts")
    assert torch.equal(loaded["t"], torch.arange(1000, dtype=torch.float32))
    assert torch.equal(loaded["model"]["weight"], weights)


@pytest.mark.parametrize("max_pending", [1, 2])
def test_arena_is_reused_and_memory_does_not_grow(tmp_path, managers, max_pending):
    state = {"w": torch.randn(MiB), "b": torch.randn(1000, dtype=torch.float64), "step": 0}  # ~4 MB
    mgr = managers(tmp_path / "ckpts", keep_last=1, compression=None, max_pending=max_pending)
    baseline = None
    for step in range(50):
        state["w"].add_(1.0)
        state["step"] = step
        mgr.save(step, state)
        if step == 4:
            mgr.wait()
            baseline = rss_bytes()
    mgr.wait()
    grown = rss_bytes() - baseline
    if max_pending == 1:
        assert mgr._admission.arenas.allocations == 1
    else:
        assert 1 <= mgr._admission.arenas.allocations <= max_pending
    assert grown < 24 * MiB, f"RSS grew by {grown / MiB:.1f} MiB over 45 saves of a 4 MiB state"
    assert mgr.steps() == [49]
    assert_same_tree(state, asyncckpt.load(tmp_path / "ckpts"))


# ---- retention -------------------------------------------------------------------------------


def test_keep_last(tmp_path, managers):
    root = tmp_path / "ckpts"
    mgr = managers(root, keep_last=2)
    for step in range(1, 6):
        mgr.save(step, randn_state(step, 1000))
    mgr.wait()
    assert step_dirs(root) == [4, 5]
    assert mgr.steps() == [4, 5]
    assert leftovers(root) == []


@pytest.mark.parametrize(("mode", "expected"), [("min", [2, 4, 6]), ("max", [1, 5, 6])])
def test_keep_best(tmp_path, managers, mode, expected):
    root = tmp_path / "ckpts"
    mgr = managers(root, keep_last=1, keep_best=2, best_metric="val", best_mode=mode)
    values = {1: 5.0, 2: 1.0, 3: 3.0, 4: 0.5, 5: 4.0, 6: 2.0}
    for step, value in values.items():
        metric = torch.tensor(value) if step % 2 else value  # 0-dim tensors are accepted as metrics
        mgr.save(step, randn_state(step, 1000), metrics={"val": metric, "other": -value})
    mgr.wait()
    assert step_dirs(root) == expected
    assert manifest_of(root, expected[0])["metrics"]["val"] == values[expected[0]]


def test_keep_every(tmp_path, managers):
    root = tmp_path / "ckpts"
    mgr = managers(root, keep_last=1, keep_every=3)
    for step in range(1, 8):
        mgr.save(step, randn_state(step, 1000))
    mgr.wait()
    assert step_dirs(root) == [3, 6, 7]


def test_keep_best_remembers_checkpoints_from_an_earlier_manager(tmp_path):
    root = tmp_path / "ckpts"
    policy = {"keep_last": 1, "keep_best": 1, "best_metric": "val"}
    with CheckpointManager(root, **policy) as mgr:
        mgr.save(1, randn_state(1, 1000), metrics={"val": 0.1})
        mgr.save(2, randn_state(2, 1000), metrics={"val": 0.9})
    assert step_dirs(root) == [1, 2]
    with CheckpointManager(root, **policy) as mgr:
        mgr.save(3, randn_state(3, 1000), metrics={"val": 0.5})
        mgr.save(4, randn_state(4, 1000), metrics={"val": 0.7})
    assert step_dirs(root) == [1, 4]


# ---- backpressure, ordering, policy ----------------------------------------------------------


def test_max_pending_one_makes_the_next_save_wait(tmp_path, managers, gate):
    mgr = managers(tmp_path / "ckpts", max_pending=1)
    h1 = mgr.save(1, randn_state(1))
    box: dict = {}
    second = threading.Thread(target=lambda: box.setdefault("h", mgr.save(2, randn_state(2))), daemon=True)
    second.start()
    second.join(0.3)
    assert second.is_alive(), "save(2) returned while save(1) was still being written"
    assert not h1.done()
    gate.set()
    second.join(60)
    assert not second.is_alive()
    h2 = box["h"]
    assert h1.done()
    h2.wait()
    record = next(r for r in mgr.stats.records if r.step == 2)
    assert record.wait_prev_s > 0
    assert mgr.steps() == [1, 2]


def test_max_pending_two_lets_one_save_overlap(tmp_path, managers, gate):
    mgr = managers(tmp_path / "ckpts", max_pending=2)
    h1 = mgr.save(1, randn_state(1))
    h2 = run_with_timeout(lambda: mgr.save(2, randn_state(2)), timeout=30)
    assert not h1.done() and not h2.done()
    box: dict = {}
    third = threading.Thread(target=lambda: box.setdefault("h", mgr.save(3, randn_state(3))), daemon=True)
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a third save started with two already pending and max_pending=2"
    gate.set()
    third.join(60)
    mgr.wait()
    assert mgr.steps() == [1, 2, 3]
    assert mgr._admission.arenas.allocations == 2


@pytest.mark.filterwarnings("ignore:asyncckpt.*already holds step:UserWarning")  # out of order on purpose
def test_steps_are_listed_oldest_first(tmp_path, managers):
    mgr = managers(tmp_path / "ckpts", keep_last=None)
    for step in (30, 10, 20, 5):
        mgr.save(step, randn_state(step, 100))
    mgr.wait()
    assert mgr.steps() == [5, 10, 20, 30]
    assert asyncckpt.load(tmp_path / "ckpts")["meta"] == {"seed": 30}


def test_maybe_save_follows_the_policy(tmp_path, managers):
    mgr = managers(tmp_path / "ckpts", keep_last=None, policy=EverySteps(3))
    state = randn_state(0, 100)
    saved = [step for step in range(0, 11) if mgr.maybe_save(step, state) is not None]
    mgr.wait()
    assert saved == [3, 6, 9]
    assert mgr.steps() == [3, 6, 9]


@pytest.mark.parametrize("step", [-1, True, 1.5, "3", 10**12])
def test_invalid_step_is_rejected(tmp_path, managers, step):
    mgr = managers(tmp_path / "ckpts")
    with pytest.raises(ValueError):
        mgr.save(step, randn_state(0, 10))
    assert step_dirs(tmp_path / "ckpts") == []


# ---- errors at save and restore ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "path"),
    [
        ({"extra": {"tags": {1, 2}}}, "state['extra']['tags']"),
        ({"extra": [0, object()]}, "state['extra'][1]"),
        ({"fn": lambda: 0}, "state['fn']"),
        ({"raw": b"bytes"}, "state['raw']"),
        ({"nested": {(1, 2): 3}}, "state['nested']"),
        ({"sparse": torch.eye(3).to_sparse()}, "state['sparse']"),
    ],
)
def test_unserialisable_leaf_raises_naming_path_and_writes_nothing(tmp_path, managers, bad, path):
    root = tmp_path / "ckpts"
    mgr = managers(root)
    state = {"w": torch.randn(100), **bad}
    with pytest.raises(TypeError) as excinfo:
        mgr.save(1, state)
    assert path in str(excinfo.value)
    mgr.wait()
    assert step_dirs(root) == []
    assert leftovers(root) == []
    assert mgr.steps() == []
    # the manager is still usable
    mgr.save(2, {"w": state["w"]}).wait()
    assert mgr.steps() == [2]


def test_shape_mismatch_at_restore_names_path_and_leaves_state_untouched(tmp_path, managers):
    torch.manual_seed(0)
    mgr = managers(tmp_path / "ckpts")
    mgr.save(4, {"w": torch.randn(5), "step": 4, "model": torch.nn.Linear(4, 3)}).wait()

    torch.manual_seed(1)
    wrong = torch.nn.Linear(4, 2)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    live = {"w": torch.zeros(5), "step": 0, "model": wrong}
    with pytest.raises(CheckpointError) as excinfo:
        mgr.restore(live)
    message = str(excinfo.value)
    assert "state['model']" in message and "weight" in message
    assert "(2, 4)" in message and "(3, 4)" in message
    assert torch.equal(live["w"], torch.zeros(5))
    assert live["step"] == 0
    for name, value in wrong.state_dict().items():
        assert torch.equal(value, before[name]), name

    plain = {"w": torch.zeros(6), "step": 0, "model": torch.nn.Linear(4, 3)}
    with pytest.raises(CheckpointError, match=r"state\['w'\]"):
        mgr.restore(plain)
    assert plain["step"] == 0


def test_restore_into_a_root_list_of_another_length_is_not_silent(tmp_path, managers):
    """restore works in place; when it cannot, it must say so rather than report success."""
    mgr = managers(tmp_path / "ckpts")
    mgr.save(1, [torch.ones(2), torch.ones(2), 5]).wait()
    live = [torch.zeros(2), torch.zeros(2)]
    try:
        step = mgr.restore(live)
    except (CheckpointError, TypeError, ValueError):
        return
    assert step == 1
    assert_same_tree([torch.ones(2), torch.ones(2), 5], live)


def test_root_that_is_a_regular_file(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("hello")
    with pytest.raises(CheckpointError):
        CheckpointManager(path)
    with pytest.raises(CheckpointError):
        asyncckpt.load(path)
    assert path.read_text() == "hello"


def test_missing_or_empty_root(tmp_path, managers):
    missing = tmp_path / "missing"
    with pytest.raises(CheckpointError):
        asyncckpt.load(missing)
    with pytest.raises(CheckpointError):
        asyncckpt.load(missing, step=1)
    assert not missing.exists()

    root = tmp_path / "ckpts"
    mgr = managers(root)
    state = {"w": torch.ones(3), "step": 7}
    assert mgr.restore(state) is None
    assert torch.equal(state["w"], torch.ones(3)) and state["step"] == 7
    with pytest.raises(CheckpointError):
        asyncckpt.load(root)

    mgr.save(1, state).wait()
    with pytest.raises(CheckpointError, match="99"):
        asyncckpt.load(root, step=99)
    with pytest.raises(CheckpointError, match="99"):
        mgr.restore(state, step=99)

    vanishing = tmp_path / "vanishing"
    other = managers(vanishing)
    shutil.rmtree(vanishing)  # the root disappears under a live manager
    with pytest.raises(CheckpointError):
        other.restore(state)


def test_second_manager_on_the_same_root_is_refused(tmp_path):
    root = tmp_path / "ckpts"
    first = CheckpointManager(root)
    try:
        with pytest.raises(CheckpointError, match="in use"):
            CheckpointManager(root)
    finally:
        first.close()
    second = CheckpointManager(root)  # the lock was released
    second.close()


def test_closed_manager_refuses_work(tmp_path):
    root = tmp_path / "ckpts"
    mgr = CheckpointManager(root)
    state = randn_state(1, 100)
    mgr.save(1, state)
    mgr.close()
    assert mgr.steps() == [1]  # close finished the pending save
    with pytest.raises(CheckpointError, match="closed"):
        mgr.save(2, state)
    with pytest.raises(CheckpointError, match="closed"):
        mgr.restore(state)
    mgr.close()  # idempotent
    assert step_dirs(root) == [1]


# ---- background failures ---------------------------------------------------------------------

INJECTION_POINTS = {
    "append": (DataFileWriter, "append"),
    "data_fsync": (DataFileWriter, "finish"),
    "manifest": (LocalBackend, "write_small"),
    "commit": (LocalBackend, "rename"),
    "os.fsync": (os, "fsync"),
}


@pytest.mark.parametrize("point", sorted(INJECTION_POINTS))
def test_background_failure_is_reported_cleaned_up_and_recoverable(tmp_path, managers, monkeypatch, point):
    root = tmp_path / "ckpts"
    mgr = managers(root, keep_last=3)
    first = randn_state(1)
    mgr.save(1, first).wait()

    monkeypatch.setattr(*INJECTION_POINTS[point], enospc)
    mgr.save(2, randn_state(2))
    with pytest.raises(CheckpointError) as excinfo:
        run_with_timeout(mgr.wait)
    message = str(excinfo.value)
    assert "step 2" in message and "No space left" in message
    monkeypatch.undo()

    assert leftovers(root) == []
    assert step_dirs(root) == [1]
    assert mgr.steps() == [1]
    assert_same_tree(first, asyncckpt.load(root))
    assert_same_tree(first, asyncckpt.load(root, step=1))

    third = randn_state(3)
    mgr.save(3, third).wait()
    mgr.wait()  # the failure was reported once and is not raised again
    assert mgr.steps() == [1, 3]
    assert_same_tree(third, asyncckpt.load(root))
    summary = mgr.stats.summary()
    assert (summary["saves"], summary["committed"], summary["failed"]) == (3, 2, 1)
    mgr.close()


def test_background_failure_is_raised_by_the_next_save(tmp_path, managers, monkeypatch):
    root = tmp_path / "ckpts"
    mgr = managers(root)
    monkeypatch.setattr(DataFileWriter, "append", enospc)
    handle = mgr.save(2, randn_state(2))
    wait_until(handle.done)
    with pytest.raises(CheckpointError) as excinfo:
        mgr.save(3, randn_state(3))  # still made (the disk is still full: it fails too), then step 2 raised
    assert "step 2" in str(excinfo.value) and "No space left" in str(excinfo.value)
    with pytest.raises(CheckpointError, match="save of step 3 failed: .*No space left"):
        mgr.wait()
    assert leftovers(root) == [] and step_dirs(root) == []
    monkeypatch.undo()
    state = randn_state(3)
    mgr.save(3, state).wait()
    assert_same_tree(state, asyncckpt.load(root))


def test_save_that_waited_for_a_failing_save_reports_it(tmp_path, managers, monkeypatch):
    """max_pending=1: save(3) waits for save(2); save(2) fails meanwhile; save(3) is the next save."""
    root = tmp_path / "ckpts"
    mgr = managers(root, max_pending=1)
    release = threading.Event()

    def gated_enospc(self, data):
        assert release.wait(60)
        enospc()

    monkeypatch.setattr(DataFileWriter, "append", gated_enospc)
    mgr.save(2, randn_state(2))
    box: dict = {}

    def third() -> None:
        try:
            box["handle"] = mgr.save(3, randn_state(3))
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=third, daemon=True)
    thread.start()
    thread.join(0.2)
    release.set()
    thread.join(60)
    assert not thread.is_alive()
    monkeypatch.undo()
    assert "error" in box, f"save(3) returned {box.get('handle')} although save(2) failed while it waited"
    assert isinstance(box["error"], CheckpointError)
    assert "step 2" in str(box["error"])


def test_handle_wait_reports_the_failure_once(tmp_path, managers, monkeypatch):
    mgr = managers(tmp_path / "ckpts")
    monkeypatch.setattr(DataFileWriter, "append", enospc)
    handle = mgr.save(5, randn_state(5))
    with pytest.raises(CheckpointError, match="step 5"):
        handle.wait(timeout=60)
    assert handle.done() and isinstance(handle.error(), CheckpointError)
    monkeypatch.undo()
    mgr.wait()  # already seen by the user through the handle
    mgr.close()


def test_close_raises_a_pending_failure_and_still_releases_the_lock(tmp_path, monkeypatch):
    root = tmp_path / "ckpts"
    mgr = CheckpointManager(root)
    monkeypatch.setattr(DataFileWriter, "append", enospc)
    mgr.save(8, randn_state(8))
    with pytest.raises(CheckpointError, match="step 8"):
        run_with_timeout(mgr.close)
    monkeypatch.undo()
    assert leftovers(root) == []
    with CheckpointManager(root) as again:  # lock released
        assert again.steps() == []


def test_encoder_failure_never_hangs(tmp_path, managers, monkeypatch):
    root = tmp_path / "ckpts"
    mgr = managers(root, chunk_size=4096, workers=2)
    good = randn_state(1, 50_000)
    mgr.save(1, good).wait()

    real_encode = asyncckpt.codec.encode
    calls = {"n": 0}
    lock = threading.Lock()

    def flaky_encode(*args, **kwargs):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 5:
            raise RuntimeError("encoder exploded")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(asyncckpt.codec, "encode", flaky_encode)
    mgr.save(2, randn_state(2, 50_000))  # ~50 chunks, several in flight when one fails
    with pytest.raises(CheckpointError) as excinfo:
        run_with_timeout(mgr.wait, timeout=60)
    assert "step 2" in str(excinfo.value) and "encoder exploded" in str(excinfo.value)
    assert leftovers(root) == []

    def broken_encode(*args, **kwargs):
        raise RuntimeError("always")

    monkeypatch.setattr(asyncckpt.codec, "encode", broken_encode)
    mgr.save(3, randn_state(3, 50_000))
    with pytest.raises(CheckpointError, match="always"):
        run_with_timeout(mgr.close, timeout=60)
    monkeypatch.undo()
    assert leftovers(root) == []
    assert step_dirs(root) == [1]
    assert_same_tree(good, asyncckpt.load(root))
    assert mgr._admission.arenas.allocations == 1  # the arena came back after each failure


# ---- corruption ------------------------------------------------------------------------------


def damage(path: Path, kind: str) -> None:
    data_file = path / "data-00000.bin"
    if kind == "flip":
        data = bytearray(data_file.read_bytes())
        data[len(data) // 2] ^= 0x01
        data_file.write_bytes(bytes(data))
    elif kind == "truncate":
        os.truncate(data_file, data_file.stat().st_size // 2)
    elif kind == "no_manifest":
        (path / "manifest.json").unlink()
    elif kind == "garbage_manifest":
        (path / "manifest.json").write_bytes(b'{"format": "asyncckpt", "vers')
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "compression", "expect"),
    [
        ("flip", "zstd", "checksum"),
        ("flip", None, "checksum"),
        ("truncate", "zstd", "truncated"),
        ("no_manifest", "zstd", "manifest"),
        ("garbage_manifest", None, "manifest"),
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, kind, compression, expect):
    root = tmp_path / "ckpts"
    older, newer = randn_state(1), randn_state(2)
    with CheckpointManager(root, compression=compression) as mgr:
        mgr.save(1, older)
        mgr.save(2, newer)
    damage(step_dir(root, 2), kind)

    with pytest.raises(CheckpointError, match=expect):
        asyncckpt.load(root, step=2)
    with pytest.warns(UserWarning, match="step-000000000002"):
        assert_same_tree(older, asyncckpt.load(root))

    live = blank_like(older)
    with CheckpointManager(root, compression=compression) as mgr:
        with pytest.warns(UserWarning, match="step-000000000002") as warned:
            assert mgr.restore(live) == 1
        assert expect in " ".join(str(w.message) for w in warned).lower()
    assert_same_tree(older, live)


def test_restore_fails_when_every_checkpoint_is_damaged(tmp_path):
    root = tmp_path / "ckpts"
    with CheckpointManager(root) as mgr:
        mgr.save(1, randn_state(1))
        mgr.save(2, randn_state(2))
    damage(step_dir(root, 1), "flip")
    damage(step_dir(root, 2), "truncate")
    live = {"w": torch.zeros(200_000), "ids": torch.zeros(5000, dtype=torch.int64), "meta": "stale"}
    with CheckpointManager(root) as mgr:
        with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no valid checkpoint"):
            mgr.restore(live)
    assert torch.equal(live["w"], torch.zeros(200_000)) and live["meta"] == "stale"
    with pytest.warns(UserWarning), pytest.raises(CheckpointError):
        asyncckpt.load(root)


# ---- replacing, lifetime, metrics ------------------------------------------------------------


def test_saving_the_same_step_twice_replaces_it(tmp_path, managers):
    root = tmp_path / "ckpts"
    mgr = managers(root)
    first, second = randn_state(1), randn_state(2)
    mgr.save(5, first, metrics={"which": 1})
    mgr.save(5, second, metrics={"which": 2})
    mgr.wait()
    assert mgr.steps() == [5]
    assert leftovers(root) == []
    assert_same_tree(second, asyncckpt.load(root))
    assert manifest_of(root, 5)["metrics"] == {"which": 2}


def test_context_manager_closes_and_releases_the_lock(tmp_path):
    root = tmp_path / "ckpts"
    state = randn_state(1, 1000)
    with CheckpointManager(root) as mgr:
        mgr.save(1, state)
    assert step_dirs(root) == [1]
    with pytest.raises(CheckpointError):
        mgr.save(2, state)
    CheckpointManager(root).close()  # the lock is free again

    with pytest.raises(ValueError) as excinfo:
        with CheckpointManager(root) as mgr:
            mgr.save(2, state)
            raise ValueError("from the training loop")
    assert type(excinfo.value) is ValueError and str(excinfo.value) == "from the training loop"
    assert step_dirs(root) == [1, 2]  # the pending save was finished on the way out
    CheckpointManager(root).close()


def test_user_exception_is_not_hidden_by_a_background_failure(tmp_path, monkeypatch):
    root = tmp_path / "ckpts"
    monkeypatch.setattr(DataFileWriter, "append", enospc)
    with pytest.raises(KeyError, match="mine"), pytest.warns(UserWarning, match="No space left"):
        with CheckpointManager(root) as mgr:
            mgr.save(1, randn_state(1, 1000))
            raise KeyError("mine")
    monkeypatch.undo()
    assert leftovers(root) == []
    CheckpointManager(root).close()


def test_metrics_summary_and_jsonl_log(tmp_path, managers):
    root = tmp_path / "ckpts"
    mgr = managers(root, compression="zstd")
    state = {"zeros": torch.zeros(MiB), "w": torch.randn(10_000)}
    for step in range(1, 5):
        mgr.save(step, state, metrics={"loss": torch.tensor(0.5 * step)}, metadata={"run": "t"})
    mgr.wait()

    summary = mgr.stats.summary()
    for key in (
        "saves",
        "committed",
        "failed",
        "stall_p50_s",
        "stall_p95_s",
        "stall_max_s",
        "persist_p50_s",
        "throughput_bytes_per_s",
        "compression_ratio",
        "raw_bytes",
        "stored_bytes",
    ):
        assert key in summary, key
    assert (summary["saves"], summary["committed"], summary["failed"]) == (4, 4, 0)
    assert summary["stall_p50_s"] >= 0 and summary["stall_max_s"] >= summary["stall_p50_s"]
    assert summary["compression_ratio"] > 5  # 4 MiB of zeros
    manifest = manifest_of(root, 4)
    assert summary["raw_bytes"] == 4 * manifest["raw_bytes"]
    assert manifest["metrics"] == {"loss": 2.0}
    assert manifest["metadata"] == {"run": "t"}

    lines = (root / "asyncckpt-metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    records = [json.loads(line) for line in lines]
    assert sorted(r["step"] for r in records) == [1, 2, 3, 4]
    assert all(r["ok"] is True and r["raw_bytes"] == manifest["raw_bytes"] for r in records)


def test_a_save_pending_at_interpreter_exit_still_commits(tmp_path):
    """A script that forgets close() must not lose its last save when Python exits."""
    import subprocess
    import sys

    root = tmp_path / "ckpts"
    script = (
        "import torch, asyncckpt\n"
        f"mgr = asyncckpt.CheckpointManager({str(root)!r})\n"
        "mgr.save(1, {'w': torch.arange(3_000_000, dtype=torch.float32)})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "failed" not in done.stderr
    assert torch.equal(asyncckpt.load(root, step=1)["w"], torch.arange(3_000_000, dtype=torch.float32))


def test_non_regular_files_and_read_errors_fall_back_instead_of_crashing(tmp_path):
    """A FIFO must not hang a reader; a directory where a file should be is damage, not a crash."""
    root = tmp_path / "ckpts"
    with asyncckpt.CheckpointManager(root, keep_last=None) as mgr:
        mgr.save(1, {"w": torch.ones(4)}).wait()
        mgr.save(2, {"w": torch.full((4,), 2.0)}).wait()
    data = root / "step-000000000002" / "data-00000.bin"
    data.unlink()
    os.mkfifo(data)
    with pytest.warns(UserWarning, match="step-000000000002.*not a regular file"):
        assert torch.equal(asyncckpt.load(root)["w"], torch.ones(4))
    manifest = root / "step-000000000001" / "manifest.json"
    manifest.unlink()
    manifest.mkdir()
    with pytest.raises(CheckpointError, match="no valid checkpoint"), pytest.warns(UserWarning):
        asyncckpt.load(root)
    mgr = asyncckpt.CheckpointManager(root)  # opens despite the damage, and releases the lock on close
    mgr.close()


def test_chunk_size_beyond_what_a_reader_accepts_is_refused(tmp_path):
    with pytest.raises(ValueError, match="chunk_size"):
        asyncckpt.CheckpointManager(tmp_path, chunk_size=2 << 30)
    asyncckpt.CheckpointManager(tmp_path).close()  # the refused one left no lock behind


def test_manifests_swapped_between_checkpoints_are_detected(tmp_path):
    root = tmp_path / "ckpts"
    with asyncckpt.CheckpointManager(root, keep_last=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((8,), float(step))}).wait()
    a, b = root / "step-000000000002" / "manifest.json", root / "step-000000000003" / "manifest.json"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(CheckpointError, match="manifest of step 2, not of step-000000000003"):
        asyncckpt.load(root, step=3)
    with pytest.warns(UserWarning, match="is the manifest of step"):  # steps 3 and 2 both skipped
        assert torch.equal(asyncckpt.load(root)["w"], torch.full((8,), 1.0))


def test_saving_below_the_newest_step_warns_once(tmp_path):
    """After a roll-back, a lower step starts a second timeline: "newest" and keep_last would both
    favour the abandoned higher steps, so the user is told (once) instead of finding out after a crash."""
    state = {"w": torch.arange(1000.0)}
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        for step in (100, 200):
            mgr.save(step, state).wait()
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mgr.save(200, state).wait()  # the same step (a replace): no second timeline
            mgr.save(300, state).wait()
        assert not [w for w in caught if "already holds" in str(w.message)]
        mgr.restore({"w": torch.zeros(1000)}, step=100)
        with pytest.warns(UserWarning, match=r"saving step 101 in .* which already holds step 300\. restore\(\)"):
            mgr.save(101, state).wait()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mgr.save(102, state).wait()  # said once per manager
        assert not [w for w in caught if "already holds" in str(w.message)]
        assert mgr.steps() == [100, 101, 102, 200, 300]


def test_prepare_pins_from_the_callers_cuda_device_not_device_0(tmp_path, monkeypatch):
    # prepare() allocates on a background thread, which starts on device 0: pinning from there
    # would open a CUDA context on GPU 0 in every rank of a one-GPU-per-process job.
    from _fake_cuda import FakeCudart
    from asyncckpt.engine.staging import ArenaPool

    fake = FakeCudart()
    fake.install(monkeypatch, device=0)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with CheckpointManager(tmp_path) as mgr:
        mgr._admission.arenas = ArenaPool(pinned=True)
        torch.cuda.set_device(2)  # the training thread's device
        mgr.prepare({"w": torch.randn(1000)}).result()
        assert fake.devices == [2] and len(fake.registered) == 1


def test_settings_are_read_only_after_construction(tmp_path):
    """The parts built from them keep their own copies: an assignment would be silently ignored."""
    with CheckpointManager(tmp_path, max_pending=2, keep_last=4, snapshot="blocking") as mgr:
        assert (mgr.max_pending, mgr.retention.keep_last, mgr.snapshot) == (2, 4, "blocking")
        for name, value in (("max_pending", 1), ("retention", None), ("snapshot", "overlap"), ("workers", 1)):
            with pytest.raises(AttributeError):
                setattr(mgr, name, value)


def test_a_save_never_waits_for_retention_deleting_an_old_checkpoint(tmp_path, monkeypatch):
    """Retention deletes on the writer thread, and removing a big checkpoint can take seconds: the
    next save must not queue behind it."""
    from asyncckpt.storage.commit import RenameCommit

    deleting, release = threading.Event(), threading.Event()
    real_delete = RenameCommit.delete

    def slow_delete(self, checkpoint):
        deleting.set()
        release.wait(60)
        real_delete(self, checkpoint)

    monkeypatch.setattr(RenameCommit, "delete", slow_delete)
    with CheckpointManager(tmp_path, keep_last=1, max_pending=2) as mgr:
        mgr.save(1, {"w": torch.ones(4)}).wait()
        mgr.save(2, {"w": torch.ones(4)})  # its commit deletes step 1
        assert deleting.wait(30)
        try:
            run_with_timeout(lambda: mgr.save(3, {"w": torch.ones(4)}), timeout=20)
        finally:
            release.set()
        mgr.wait()
        assert mgr.steps() == [3]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_default_workers_are_the_cores_the_process_may_use_shared_by_the_ranks_on_its_host(tmp_path, monkeypatch):
    def workers(name: str) -> int:
        with CheckpointManager(tmp_path / name) as mgr:
            return mgr.workers

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert workers("alone") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's ranks on this host share its cores
    assert workers("four") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert workers("many") == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert workers("junk") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6})  # pinned: its share already
    assert workers("pinned") == 3
    with CheckpointManager(tmp_path / "asked", workers=5) as mgr:
        assert mgr.workers == 5
        mgr.save(1, {"w": torch.arange(10.0)}).wait()
    assert torch.equal(asyncckpt.load(tmp_path / "asked")["w"], torch.arange(10.0))


def test_a_relative_root_stays_the_root_it_locked_after_the_working_directory_changes(tmp_path, monkeypatch):
    """A launcher (or hydra) may chdir after the manager opened ``ckpts``: saves and retention must
    go on in the root it locked, never in another run's root of the same name."""
    (tmp_path / "a").mkdir()
    other = tmp_path / "b" / "ckpts"
    with CheckpointManager(other, keep_last=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((3,), float(step))}).wait()
    before = sorted(os.listdir(other))
    monkeypatch.chdir(tmp_path / "a")
    with CheckpointManager("ckpts", keep_last=1, mirror="mirror") as mgr:
        monkeypatch.chdir(tmp_path / "b")
        saved = mgr.save(10, {"w": torch.zeros(3)}).wait()
        mgr.wait(mirror=True)
    assert saved == tmp_path / "a" / "ckpts" / "step-000000000010"
    assert sorted(os.listdir(other)) == before  # nothing written, nothing pruned
    assert asyncckpt.load(tmp_path / "a" / "ckpts")["w"].tolist() == [0.0] * 3
    assert asyncckpt.load(tmp_path / "a" / "mirror")["w"].tolist() == [0.0] * 3
    assert not (tmp_path / "b" / "mirror").exists()


class _ItemWithSizeMethod:
    """A metric-like object whose ``size`` is a method (as some array types have) and whose item fails."""

    def size(self) -> int:
        return 3

    def item(self) -> float:
        raise ValueError("only one element tensors can be converted to Python scalars")


@pytest.mark.parametrize(
    "value", [torch.ones(3), np.ones(3), torch.ones(0), _ItemWithSizeMethod()], ids=["tensor", "array", "empty", "odd"]
)
def test_a_metric_of_several_values_is_a_type_error_naming_it(tmp_path, value):
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(TypeError, match=r"metrics\['loss'\] must be a single number"):
            mgr.save(1, {"w": torch.ones(2)}, metrics={"loss": value})
        mgr.save(2, {"w": torch.ones(2)}, metrics={"loss": torch.tensor([0.5]), "acc": np.float32(0.25)}).wait()
        assert mgr.steps() == [2]
