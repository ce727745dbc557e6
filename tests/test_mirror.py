"""The local tier mirrored to a second root: each committed checkpoint is uploaded in the
background, verified there, kept by the mirror's own retention, and restored from when the local
root has nothing better; failures surface at the next save, wait or close, naming the step, the
object and the cause.

The mirror here is a local root committed as an object store is (``atomic_rename=False``: the
manifest written last), wrapped where a test needs its writes to fail or to wait.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch

import asyncckpt
from _cli import cli, strict_json
from _trees import assert_same_tree
from _waiting import run_with_timeout
from asyncckpt import CheckpointError, CheckpointManager
from asyncckpt.engine.mirror import MIRROR_FILE, safe_location
from asyncckpt.format import step_dir_name
from asyncckpt.storage.local import DataFileWriter, LocalBackend


class _Stream:
    """A remote data object whose appends fail while the backend is "down", or wait for a gate."""

    def __init__(self, inner: DataFileWriter, backend: RemoteBackend) -> None:
        self._inner = inner
        self._backend = backend
        self.name = inner.name
        self.size = 0

    def append(self, data):
        self._backend.entered.set()
        if self._backend.gate is not None:
            for _ in range(1200):
                if self._backend.gate.wait(0.05) or self._backend.release():
                    break
            else:
                raise AssertionError("the test never opened the gate")
        if self._backend.down:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        offset = self._inner.append(data)
        self.size = self._inner.size
        return offset

    def finish(self):
        self._inner.finish()

    def abort(self):
        self._inner.abort()


class RemoteBackend(LocalBackend):
    """A local root committed without renames (as on an object store), with a switch that makes
    its writes fail (the endpoint is down) and a gate its appends wait on (a slow upload)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, atomic_rename=False)
        self.down = False
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.release = lambda: False  # lets an append held at the gate go on

    def open_write(self, name, size_hint=None):
        if self.down:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return _Stream(super().open_write(name, size_hint), self)

    def write_small(self, name, data):
        if self.down:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        super().write_small(name, data)


def state_of(step: int, size: tuple[int, int, int] = (64, 33, 257)) -> dict:
    """A small state whose bytes depend on ``step`` (a float matrix rows x cols, n ints)."""
    rows, cols, n = size
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(rows, cols, generator=g),
        "b": torch.randint(0, 1000, (n,), generator=g),
        "step": step,
    }


def blank(size: tuple[int, int, int] = (64, 33, 257)) -> dict:
    """A state of ``state_of``'s shapes to restore into."""
    rows, cols, n = size
    return {"w": torch.zeros(rows, cols), "b": torch.zeros(n, dtype=torch.int64), "step": -1}


def mirror_steps(remote: Path) -> list[int]:
    """The steps committed in the mirror: those with a manifest generation (written last)."""
    return sorted(int(p.name.removeprefix("step-")) for p in remote.glob("step-*") if any(p.glob("manifest-*.json")))


def local_steps(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*"))


def manager(local: Path, remote: RemoteBackend | Path, **options) -> CheckpointManager:
    options.setdefault("compression", "zstd")
    # saves in a row must all reach the mirror, however slow the machine: the bounded lag's skip
    # is tested on its own, with the lag it names
    options.setdefault("mirror_max_behind", 16)
    return CheckpointManager(local, mirror=remote, **options)


def copy_held(mgr: CheckpointManager, remote: RemoteBackend, step: int, state: dict | None = None) -> None:
    """Save ``step`` and return once its copy to the mirror is held at its first write (until the
    test sets ``remote.gate``, or ``remote.release`` says so)."""
    remote.gate = threading.Event()
    remote.entered.clear()
    mgr.save(step, state_of(step) if state is None else state).wait()
    assert remote.entered.wait(60)


def test_restore_from_the_mirror_bit_exact_after_the_local_root_is_deleted(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    with manager(local, RemoteBackend(remote), chunk_size=4096) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state_of(step))
        mgr.wait(mirror=True)
    assert mirror_steps(remote) == [1, 2, 3]
    assert not list(remote.glob("step-*/manifest.json"))  # committed manifest-last, as on a store
    shutil.rmtree(local)  # the node is gone, and its disk with it

    state = blank()
    with manager(local, RemoteBackend(remote)) as mgr:
        with pytest.warns(UserWarning, match=r"restoring step 3 from the mirror .*does not have it"):
            assert mgr.restore(state) == 3
    assert_same_tree(state, state_of(3))


def test_a_damaged_local_newest_checkpoint_is_restored_from_the_mirror(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    with manager(local, RemoteBackend(remote), compression=None) as mgr:
        mgr.save(1, state_of(1))
        mgr.save(2, state_of(2))
        mgr.wait(mirror=True)
    data = local / step_dir_name(2) / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))

    state = blank()
    with manager(local, RemoteBackend(remote)) as mgr:
        with pytest.warns(UserWarning) as caught:
            assert mgr.restore(state) == 2  # not the older local step 1
    assert_same_tree(state, state_of(2))
    messages = [str(w.message) for w in caught]
    assert any("step 2 in the local root cannot be read" in m and "checksum" in m for m in messages), messages
    assert any("restoring step 2 from the mirror" in m and "cannot read it" in m for m in messages), messages


def test_a_failing_mirror_is_raised_at_the_next_save_wait_and_close_and_recovers(tmp_path):
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    mgr = manager(local, remote)
    try:
        mgr.save(1, state_of(1))
        mgr.wait(mirror=True)
        remote.down = True  # the endpoint stops answering

        mgr.save(2, state_of(2))
        with pytest.raises(CheckpointError) as raised:
            mgr.wait(mirror=True)
        message = str(raised.value)
        assert "step 2" in message
        assert f"{remote_dir}/{step_dir_name(2)}/data-00000-" in message  # the object
        assert "Connection refused" in message  # the cause
        assert local_steps(local)[-1] == 2  # the local checkpoint stands
        mgr.wait(mirror=True)  # raised once

        mgr.save(3, state_of(3)).wait()  # training goes on: saves to the local root are unaffected
        mgr._mirror.wait(None)  # (step 3 was handed over at its commit: its upload has failed by now)
        with pytest.raises(CheckpointError, match=r"step 3 was not mirrored.*Connection refused"):
            mgr.save(4, state_of(4))  # raised by the next save, which is made all the same
        with pytest.raises(CheckpointError, match=r"step 4 was not mirrored.*Connection refused"):
            mgr.wait(mirror=True)
        assert local_steps(local)[-1] == 4
        assert mirror_steps(remote_dir) == [1]  # nothing partial is visible in the mirror

        remote.down = False  # the endpoint is back: the next commit is mirrored again
        mgr.save(5, state_of(5))
        mgr.wait(mirror=True)
        assert 5 in mirror_steps(remote_dir)

        remote.down = True
        mgr.save(6, state_of(6))
    finally:
        with pytest.raises(CheckpointError, match=r"step 6 was not mirrored.*data-00000-.*Connection refused"):
            mgr.close()
    state = blank()
    with CheckpointManager(remote_dir) as reader:  # what the mirror holds verifies
        assert reader.restore(state) == 5
    assert_same_tree(state, state_of(5))


def test_the_mirror_falls_behind_by_at_most_max_behind_skipping_the_oldest_waiting(tmp_path):
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    remote.gate = threading.Event()  # uploads wait until the test lets them go
    mgr = manager(local, remote, keep_last=1, mirror_retention={"keep_last": None}, mirror_max_behind=2)
    try:
        mgr.save(1, state_of(1)).wait()
        assert remote.entered.wait(60)  # step 1 is uploading, held at its first write
        mgr.save(2, state_of(2)).wait()  # waiting: two behind, within the bound
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mgr.save(3, state_of(3)).wait()  # three behind: step 2 is skipped
            mgr.save(4, state_of(4)).wait()  # step 3 is skipped: the same episode, no new warning
        lag = [str(w.message) for w in caught if "fell 2 checkpoints behind" in str(w.message)]
        assert len(lag) == 1, lag
        assert "step 2 will not be mirrored" in lag[0]
        summary = mgr.stats.summary()
        assert summary["mirror_skipped"] == 2 and summary["mirror_behind"] == 2
        # local retention (keep 1) deleted the skipped steps, never the uploading or waiting one
        assert local_steps(local) == [1, 4]

        remote.gate.set()
        mgr.wait(mirror=True)
        assert mirror_steps(remote_dir) == [1, 4]
        assert mgr.stats.summary()["mirror_behind"] == 0
        mgr.save(5, state_of(5))
        mgr.wait(mirror=True)
        assert local_steps(local) == [5]  # unpinned once uploaded: retention applies again
        assert mirror_steps(remote_dir) == [1, 4, 5]
    finally:
        remote.gate.set()
        mgr.close()


def test_retention_differs_per_tier(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    with manager(local, RemoteBackend(remote), keep_last=1, mirror_retention={"keep_last": 3}) as mgr:
        for step in range(1, 6):
            mgr.save(step, state_of(step))
            mgr.wait(mirror=True)
        assert mgr.steps() == [5]
    assert local_steps(local) == [5]
    assert mirror_steps(remote) == [3, 4, 5]
    assert sorted(p.name for p in remote.iterdir() if p.name.startswith("step-")) == [
        step_dir_name(s) for s in (3, 4, 5)
    ]  # deleted whole, data and all


def test_ls_shows_where_each_checkpoint_lives(tmp_path, capsys):
    local, remote = tmp_path / "local", tmp_path / "remote"
    with manager(local, RemoteBackend(remote), keep_last=1, mirror_retention={"keep_last": 3}) as mgr:
        for step in range(1, 5):
            mgr.save(step, state_of(step))
            mgr.wait(mirror=True)
    assert json.loads((local / MIRROR_FILE).read_text()) == {"mirror": str(remote)}

    code, out, _ = cli(capsys, "ls", local, "--json")
    assert code == 0
    assert [(r["step"], r["where"]) for r in strict_json(out)] == [(2, "mirror"), (3, "mirror"), (4, "both")]
    code, out, _ = cli(capsys, "ls", local)
    assert code == 0 and f"mirror: {remote}" in out
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert lines == {"2": "mirror", "3": "mirror", "4": "both"}

    shutil.rmtree(local)
    code, out, _ = cli(capsys, "ls", local, "--mirror", remote, "--json")
    assert code == 0
    assert [(r["step"], r["where"]) for r in strict_json(out)] == [(2, "mirror"), (3, "mirror"), (4, "mirror")]


@pytest.mark.parametrize("odd", ["fifo", "link"])
def test_ls_neither_waits_on_nor_follows_an_odd_mirror_record(tmp_path, capsys, odd):
    """The record of the mirror is read as a small regular file or not at all: a FIFO there must
    not hang ``ls``, a link must not be followed (to a record of another root, say)."""
    local = tmp_path / "local"
    with CheckpointManager(local) as mgr:
        mgr.save(1, state_of(1)).wait()
    if odd == "fifo":
        os.mkfifo(local / MIRROR_FILE)
    else:
        elsewhere = tmp_path / "elsewhere.json"
        elsewhere.write_text(json.dumps({"mirror": str(tmp_path / "other")}))
        (local / MIRROR_FILE).symlink_to(elsewhere)
    code, out, _ = run_with_timeout(lambda: cli(capsys, "ls", local, "--json"), 30)
    rows = strict_json(out)
    assert code == 0 and [r["step"] for r in rows] == [1]
    assert all("where" not in r for r in rows)  # no mirror recorded: none listed


def test_a_fifo_at_the_mirror_records_temporary_name_never_blocks_a_manager(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    os.mkfifo(local / f"{MIRROR_FILE}.{os.getpid()}.tmp")

    def open_and_save() -> None:
        with manager(local, RemoteBackend(remote)) as mgr:
            mgr.save(1, state_of(1)).wait()

    run_with_timeout(open_and_save, 60)
    assert json.loads((local / MIRROR_FILE).read_text()) == {"mirror": str(remote)}


def test_a_new_manager_uploads_the_newest_local_checkpoint_the_mirror_lacks(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    with CheckpointManager(local) as mgr:  # a root that had no mirror yet
        mgr.save(7, state_of(7))
    with manager(local, RemoteBackend(remote)) as mgr:
        mgr.wait(mirror=True)
    assert mirror_steps(remote) == [7]


def test_the_recorded_mirror_location_never_holds_credentials():
    assert safe_location("s3://AKIA:secret@bucket/prefix?token=x#f") == "s3://bucket/prefix"
    assert safe_location("https://user:pw@host:9000/b/p") == "https://host:9000/b/p"
    assert safe_location("/data/mirror") == "/data/mirror"
    # what is not a credential is kept as written: the recorded location must name the same root
    assert safe_location("memory://Bucket/Run-1") == "memory://Bucket/Run-1"
    assert safe_location("https://key:pw@[::1]:9000/b") == "https://[::1]:9000/b"
    assert safe_location("s3://bucket/a@b/prefix") == "s3://bucket/a@b/prefix"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"mirror_max_behind": 0}, ValueError),
        ({"mirror_timeout": 0}, ValueError),
        ({"mirror_retention": {"keep_lats": 3}}, ValueError),
        ({"mirror_retention": 3}, TypeError),
    ],
)
def test_mirror_options_are_checked(tmp_path, options, error):
    with pytest.raises(error):
        CheckpointManager(tmp_path / "local", mirror=tmp_path / "remote", **options)
    with CheckpointManager(tmp_path / "local"):  # nothing was left locked
        pass


@pytest.mark.parametrize("name", ["same", "symlink", "file-url"])
def test_a_mirror_that_is_the_root_itself_is_told_as_such(tmp_path, name):
    root = tmp_path / "local"
    root.mkdir()
    (tmp_path / "link").symlink_to(root)
    mirror = {"same": str(root), "symlink": tmp_path / "link", "file-url": f"file://{root}"}[name]
    with pytest.raises(ValueError, match=r"mirror=.* is the checkpoint root itself \(.*local\); a mirror is a second"):
        CheckpointManager(root, mirror=mirror)
    with CheckpointManager(root):  # nothing was left locked
        pass
    with CheckpointManager(root):  # a root really in use is still told as that
        with pytest.raises(asyncckpt.RootInUseError, match="already open in this process"):
            CheckpointManager(tmp_path / "other", mirror=root)


def test_load_with_mirror_reads_what_the_local_root_lacks(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    with manager(local, RemoteBackend(remote), keep_last=1, mirror_retention={"keep_last": 3}) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state_of(step))
            mgr.wait(mirror=True)
    with pytest.warns(UserWarning, match="restoring step 2 from the mirror"):
        assert_same_tree(asyncckpt.load(local, step=2, mirror=remote), state_of(2))
    assert_same_tree(asyncckpt.load(local, mirror=remote), state_of(3))  # the local newest: no warning
    shutil.rmtree(local)
    with pytest.warns(UserWarning, match="restoring step 3 from the mirror"):
        assert_same_tree(asyncckpt.load(local, mirror=remote), state_of(3))
    with pytest.raises(asyncckpt.CheckpointNotFoundError):
        asyncckpt.load(local)  # without mirror=, local only


def test_close_waits_for_uploads_at_most_mirror_timeout(tmp_path):
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    remote.gate = threading.Event()  # never opened: the upload outlasts the timeout
    mgr = manager(local, remote, mirror_timeout=0.2)
    remote.release = lambda: mgr._mirror._cancel  # the held write returns once the mirror gives up
    mgr.save(1, state_of(1))
    with pytest.raises(CheckpointError, match=r"step 1 was not mirrored to .*within mirror_timeout=0.2 s"):
        mgr.close()
    assert local_steps(local) == [1]
    assert mirror_steps(remote_dir) == []  # the upload cut short left nothing visible
    with CheckpointManager(remote_dir):  # its lock was released
        pass


def test_the_local_root_stays_locked_while_close_waits_for_the_mirror(tmp_path):
    # The upload still reads the local checkpoint: another writer (a restarted run, prune) must not
    # get the local root, and delete that checkpoint under it, before the mirror is done.
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    remote.gate = threading.Event()
    mgr = manager(local, remote)
    mirror_waiting = threading.Event()
    wait = mgr._mirror.wait

    def waiting(timeout):
        mirror_waiting.set()
        return wait(timeout)

    mgr._mirror.wait = waiting  # (tells the test when close has reached the mirror)
    mgr.save(1, state_of(1)).wait()
    assert remote.entered.wait(60)  # step 1 is uploading, held at its first write
    closing = threading.Thread(target=mgr.close)
    closing.start()
    try:
        assert mirror_waiting.wait(60)
        with pytest.raises(asyncckpt.RootInUseError):
            CheckpointManager(local)
    finally:
        remote.gate.set()
        closing.join(60)
    assert mirror_steps(remote_dir) == [1]
    with CheckpointManager(local):  # released once the mirror is closed
        pass


def test_uploads_failing_before_the_next_call_are_all_told(tmp_path):
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    mgr = manager(local, remote, mirror_max_behind=3)
    try:
        mgr.save(1, state_of(1))
        mgr.wait(mirror=True)
        copy_held(mgr, remote, 2)  # step 2 is uploading, held at its first write
        mgr.save(3, state_of(3)).wait()  # waiting behind it
        remote.down = True
        remote.gate.set()  # both uploads fail before the loop calls the manager again
        mgr._mirror.wait(None)
        with pytest.raises(CheckpointError) as raised:
            mgr.wait(mirror=True)
        message = str(raised.value)
        assert "step 2 was not mirrored" in message and f"{step_dir_name(2)}/data-00000-" in message
        assert "step 3 was not mirrored" in message and f"{step_dir_name(3)}/data-00000-" in message
        mgr.wait(mirror=True)  # told once
    finally:
        remote.gate.set()
        remote.down = False
        mgr.close()


def test_load_with_a_mirror_url_never_shows_its_credentials(tmp_path):
    """A user:password inside a mirror URL must not reach load's messages (the manager already
    strips it from what it records)."""
    with pytest.raises(asyncckpt.CheckpointError) as info, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncckpt.load(tmp_path / "empty", mirror="file://alice:s3cret@localhost" + str(tmp_path / "nothing"))
    assert "s3cret" not in str(info.value) and "cannot be listed" in str(info.value)
    assert not any("s3cret" in str(w.message) for w in caught)
    (tmp_path / "local").mkdir()
    with CheckpointManager(tmp_path / "local") as mgr:
        mgr.save(1, {"w": torch.ones(2)}).wait()
    with warnings.catch_warnings(record=True) as caught:  # read around the mirror, warned
        warnings.simplefilter("always")
        asyncckpt.load(tmp_path / "local", mirror="file://alice:s3cret@localhost" + str(tmp_path / "nothing"))
    assert caught and not any("s3cret" in str(w.message) for w in caught)


def test_a_step_pruned_on_both_tiers_between_listing_and_reading_is_no_failure(tmp_path, monkeypatch):
    """A live writer's retention (locally and in its mirror) deleted the step a reader of both tiers
    had just listed: it was warned about as unreadable, in each tier, and an older step (or none)
    came back. The tiers are listed again and the newest read, without a word."""
    import asyncckpt.loading as loading

    local, mirror = tmp_path / "local", tmp_path / "mirror"
    with CheckpointManager(local, mirror=mirror, keep_last=1) as mgr:
        mgr.save(5, {"w": torch.full((100,), 5.0)})
        mgr.wait(mirror=True)
        listing, done = loading._tier_steps, []

        def listed_then_pruned(root):
            steps = listing(root)
            if not done and Path(os.fspath(getattr(root, "location", root))) == mirror:
                done.append(True)  # both tiers listed: step 6 commits, and step 5 goes from both
                mgr.save(6, {"w": torch.full((100,), 6.0)})
                mgr.wait(mirror=True)
            return steps

        monkeypatch.setattr(loading, "_tier_steps", listed_then_pruned)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = asyncckpt.load(local, mirror=mirror)
    assert done and out["w"][0].item() == 6.0
    assert [str(w.message) for w in caught] == []


def mirror_tags(remote: Path) -> dict[int, list[str]]:
    """Each step's tags in the mirror, read from its manifest there."""
    from asyncckpt.cli.tools import mirror_checkpoints
    from asyncckpt.engine.reader import read_manifest

    return {c.step: read_manifest(c.ref).tags for c in mirror_checkpoints(str(remote))}


def test_a_tag_given_after_the_upload_reaches_the_mirror_whose_retention_then_keeps_it(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    with manager(local, RemoteBackend(remote), keep_last=1, mirror_retention={"keep_last": 2}) as mgr:
        mgr.save(1, state_of(1))
        mgr.wait(mirror=True)
        assert mgr.tag(1, "best") == ["best"]
        for step in (2, 3, 4):
            mgr.save(step, state_of(step))
            mgr.wait(mirror=True)
        assert mirror_tags(remote) == {1: ["best"], 3: [], 4: []}  # the tagged step outlived the mirror's keep_last
        assert mgr.untag(1) == []
        mgr.save(5, state_of(5))
        mgr.wait(mirror=True)
    assert mirror_tags(remote) == {4: [], 5: []}  # untagged there too: retention took it
    assert local_steps(local) == [5]


def test_a_tag_given_while_its_step_is_being_copied_reaches_the_copy(tmp_path):
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    with manager(local, remote) as mgr:
        copy_held(mgr, remote, 1)  # the copy read the manifest, without the tag, and is writing
        mgr.tag(1, "keep")
        remote.gate.set()
        mgr.wait(mirror=True)
    assert mirror_tags(remote_dir) == {1: ["keep"]}


def test_a_tag_that_cannot_reach_the_mirror_is_raised_at_the_next_call(tmp_path):
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    with manager(local, remote) as mgr:
        mgr.save(1, state_of(1))
        mgr.wait(mirror=True)
        remote.down = True
        assert mgr.tag(1, "keep") == ["keep"]  # the local checkpoint has it at once
        with pytest.raises(CheckpointError, match=r"the tags of step 1 did not reach its copy in .*Connection refused"):
            mgr.wait(mirror=True)
        remote.down = False
    assert mirror_tags(remote_dir) == {1: []}


def test_a_step_tagged_while_a_later_step_is_copied_is_kept_by_the_mirrors_retention(tmp_path):
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    with manager(local, remote, keep_last=2, mirror_retention={"keep_last": 1}) as mgr:
        mgr.save(1, state_of(1))
        mgr.wait(mirror=True)
        copy_held(mgr, remote, 2)  # 2 is being copied: its retention comes before step 1's rewrite
        mgr.tag(1, "keep")
        remote.gate.set()
        mgr.wait(mirror=True)
    assert mirror_tags(remote_dir) == {1: ["keep"], 2: []}


def test_an_untag_reaches_the_mirror_after_the_local_root_deleted_the_step(tmp_path):
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    with manager(local, remote, keep_last=1, mirror_retention={"keep_last": 1}) as mgr:
        mgr.save(1, state_of(1), tags=["best"])
        mgr.wait(mirror=True)
        copy_held(mgr, remote, 2)
        mgr.untag(1)
        mgr.save(3, state_of(3)).wait()  # local retention deletes step 1 before its rewrite in the mirror
        remote.gate.set()
        mgr.wait(mirror=True)
        for step in (4, 5):
            mgr.save(step, state_of(step))
            mgr.wait(mirror=True)
    assert local_steps(local) == [5] and mirror_tags(remote_dir) == {5: []}


class _HeldManifests(RemoteBackend):
    """Manifest writes wait while ``hold`` is clear; once ``dead``, they fail."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.hold = threading.Event()
        self.hold.set()
        self.dead = False

    def write_small(self, name, data):
        if "manifest" in name:
            self.hold.wait(60)
            if self.dead:
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        super().write_small(name, data)


def test_a_tag_rewrite_outlasting_the_timeout_is_raised_and_the_next_manager_writes_it(tmp_path):
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = _HeldManifests(remote_dir)
    mgr = manager(local, remote, mirror_timeout=1.0)
    mgr.save(1, state_of(1))
    mgr.wait(mirror=True)
    remote.hold.clear()  # the store stops answering manifest writes
    mgr.tag(1, "keep")
    with pytest.raises(CheckpointError, match=r"the tags of step 1 are not in the mirror .* \(still being written\)"):
        mgr.wait(mirror=True)

    def store_fails() -> None:  # once close gave up on the rewrite (after mirror_timeout)
        remote.dead = True
        remote.hold.set()

    threading.Timer(1.5, store_fails).start()
    # the rewrite given up at close, or failing while close waits for the thread: either is raised
    with pytest.raises(CheckpointError, match=r"the tags of step 1 (were not written to .* at close|did not reach)"):
        mgr.close()
    assert mirror_tags(remote_dir) == {1: []}
    with manager(local, RemoteBackend(remote_dir)) as mgr:
        mgr.wait(mirror=True)
    assert mirror_tags(remote_dir) == {1: ["keep"]}


def test_a_refused_rollback_hands_back_the_copies_it_held(tmp_path):
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    with manager(local, remote, keep_last=None) as mgr:
        mgr.save(1, state_of(1))
        mgr.wait(mirror=True)
        remote.release = lambda: mgr._mirror._floor is not None
        copy_held(mgr, remote, 2)  # 2 is being copied; 3 waits behind it
        mgr.save(3, state_of(3), tags=["best"]).wait()
        with pytest.raises(CheckpointError, match=r"tagged checkpoints above it: step 3 in the root \(best\)"):
            mgr.discard_after(1)
        remote.gate.set()
        mgr.wait(mirror=True)
    assert sorted(mirror_tags(remote_dir)) == [1, 2, 3]


def test_steps_a_refused_rollback_held_back_are_kept_locally_and_mirrored(tmp_path):
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    with manager(local, remote, keep_last=1, mirror_retention={"keep_last": 10}) as mgr:
        mgr.save(1, state_of(1))
        mgr.wait(mirror=True)
        mgr.save(2, state_of(2), tags=["best"])
        mgr.wait(mirror=True)
        remote.release = lambda: mgr._mirror._floor is not None
        copy_held(mgr, remote, 3)  # 3 is being copied
        mgr.save(4, state_of(4)).wait()  # 4 waits behind it
        mgr.save(5, state_of(5))  # still pending: its retention (keep_last=1) runs inside the rollback
        with pytest.raises(CheckpointError, match=r"tagged checkpoints above it: step 2"):
            mgr.discard_after(1)
        remote.gate.set()
        mgr.wait(mirror=True)
    assert {3, 4, 5} <= set(mirror_tags(remote_dir))  # none lost to local retention before its copy


def _unreachable_s3() -> tuple[str, dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s", "region": "us-east-1"}
    return "s3://ckpt/run", {**options, "connect_timeout": 0.5, "timeout": 1, "retries": 0}


def test_a_mirror_that_cannot_be_listed_is_no_proof_there_is_no_checkpoint(tmp_path):
    """A node that lost its disk, while the store does not answer: "nothing to restore" would start
    the job over with its checkpoints sitting in the mirror."""
    mirror, options = _unreachable_s3()
    with pytest.raises(CheckpointError, match=r"the mirror .* cannot be listed \(.*\) and the local root .* holds no "):
        asyncckpt.load(tmp_path / "gone", mirror=mirror, mirror_options=options)
    with pytest.raises(CheckpointError, match="has no step 3: whether the mirror holds one is unknown"):
        asyncckpt.load(tmp_path / "gone", step=3, mirror=mirror, mirror_options=options)
    with CheckpointManager(tmp_path / "local") as mgr:  # the local root leads its mirror: read, warned
        mgr.save(2, {"w": torch.ones(3)}).wait()
    with pytest.warns(UserWarning, match="cannot be listed .*; reading the local root only"):
        got = asyncckpt.load(tmp_path / "local", mirror=mirror, mirror_options=options)
    assert torch.equal(got["w"], torch.ones(3))
