"""A rollback, from the command line (`asyncckpt prune --after N`, the job stopped) or from the
training job itself (`CheckpointManager.discard_after(N)`): the abandoned run's later checkpoints
leave the root and its mirror, so a restore after the next crash resumes the run rolled back to,
never the one abandoned."""

from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch

from _cli import cli, remaining, strict_json
from asyncckpt import CheckpointDamagedError, CheckpointError, CheckpointManager, CheckpointNotFoundError
from asyncckpt.engine.reader import read_manifest
from asyncckpt.format import step_dir_name
from conftest import fresh_s3_url

STEPS = [10, 20, 30, 40, 50]


def state_of(step: int) -> dict:
    return {"w": torch.full((64,), float(step)), "step": step}


def blank() -> dict:
    return {"w": torch.zeros(64), "step": -1}


def save_run(local: Path | str, mirror: Path | str, tags: dict[int, list[str]] | None = None) -> None:
    with CheckpointManager(local, mirror=str(mirror), keep_last=None, mirror_retention={"keep_last": None}) as mgr:
        for step in STEPS:
            mgr.save(step, state_of(step), tags=(tags or {}).get(step, ()))
            mgr.wait(mirror=True)  # every step in the mirror: none skipped


def restored_step(local: Path, mirror: Path | str) -> int:
    state = blank()
    with CheckpointManager(local, mirror=str(mirror)) as mgr:
        step = mgr.restore(state)
    assert state["step"] == step and torch.equal(state["w"], state_of(step)["w"])
    return step


@pytest.fixture
def tiers(tmp_path) -> tuple[Path, Path]:
    local, mirror = tmp_path / "local", tmp_path / "mirror"
    save_run(local, mirror)
    return local, mirror


def test_a_rollback_leaves_neither_tier_holding_the_abandoned_steps(tiers, capsys):
    local, mirror = tiers
    assert restored_step(local, mirror) == 50  # what a crash would resume without the rollback
    code, out, err = cli(capsys, "prune", local, "--after", "30")
    assert code == 0, err
    assert remaining(local) == [10, 20, 30] and remaining(mirror) == [10, 20, 30]
    assert "deleted step 50 from the mirror" in out and "deleted step 40 from the root" in out
    assert f"deleted 4: the newest step is now 30 in {local} and its mirror {mirror}" in out
    assert restored_step(local, mirror) == 30
    # the rolled-back run goes on: its saves land above 30 again, and nothing of the old one is back
    with CheckpointManager(local, mirror=str(mirror), keep_last=None, mirror_retention={"keep_last": None}) as mgr:
        mgr.restore(blank())
        mgr.save(40, {"w": torch.full((64,), -40.0), "step": 40})
        mgr.wait(mirror=True)
    state = blank()
    with CheckpointManager(local, mirror=str(mirror)) as mgr:
        assert mgr.restore(state) == 40
    assert torch.equal(state["w"], torch.full((64,), -40.0))


def test_a_dry_run_lists_both_tiers_and_deletes_nothing(tiers, capsys):
    local, mirror = tiers
    code, out, _ = cli(capsys, "prune", local, "--after", "30", "--dry-run")
    assert code == 0
    assert out.splitlines() == [
        "would delete step 50 from the mirror",
        "would delete step 40 from the mirror",
        "would delete step 50 from the root",
        "would delete step 40 from the root",
        f"would delete 4: the newest step is now 30 in {local} and its mirror {mirror}",
    ]
    assert remaining(local) == STEPS and remaining(mirror) == STEPS


def test_local_only_leaves_the_mirror_alone_and_says_what_it_still_holds(tiers, capsys):
    local, mirror = tiers
    code, _, err = cli(capsys, "prune", local, "--after", "20", "--local-only")
    assert code == 0
    assert remaining(local) == [10, 20] and remaining(mirror) == STEPS
    assert f"the mirror recorded in the root, {mirror}, still holds steps [30, 40, 50] above 20: a restore" in err


def test_a_mirror_named_by_hand_must_hold_the_step_unless_it_is_the_recorded_one(tiers, tmp_path, capsys):
    local, mirror = tiers
    other = tmp_path / "other-job"
    with CheckpointManager(other, keep_last=None) as mgr:
        for step in (10, 90):
            mgr.save(step, state_of(step))
    code, _, err = cli(capsys, "prune", local, "--after", "30", "--mirror", other)
    assert code == 2 and f"the mirror {other} holds no step 30" in err
    assert remaining(other) == [10, 90] and remaining(local) == STEPS
    code, _, err = cli(capsys, "prune", local, "--after", "30", "--mirror", tmp_path / "typo")
    assert code == 2 and "is not a directory; nothing deleted" in err
    assert not (tmp_path / "typo").exists()
    code, _, err = cli(capsys, "prune", local, "--after", "40", "--mirror", f"{mirror}/")  # the recorded one
    assert code == 0 and "still holds" not in err
    assert remaining(mirror) == [10, 20, 30, 40]


def test_a_recorded_mirror_that_is_gone_is_said_and_not_made(tiers, capsys):
    local, mirror = tiers
    shutil.rmtree(mirror)
    code, out, _ = cli(capsys, "prune", local, "--after", "30")
    assert code == 0 and f"the mirror recorded in the root, {mirror}, does not exist" in out
    assert not mirror.exists() and remaining(local) == [10, 20, 30]


def test_the_step_is_checked_under_the_roots_lock(tiers, capsys, monkeypatch):
    """A job writing meanwhile could delete the step just verified; under the lock none can."""
    from asyncckpt.engine import reader
    from asyncckpt.errors import RootInUseError

    local, mirror = tiers
    real, tried = reader.verify_checkpoint, []

    def verify(ref, *args, **kwargs):
        with pytest.raises(RootInUseError):
            CheckpointManager(local)
        tried.append(ref)
        return real(ref, *args, **kwargs)

    monkeypatch.setattr(reader, "verify_checkpoint", verify)  # where the rollback check calls it
    assert cli(capsys, "prune", local, "--after", "30")[0] == 0
    assert len(tried) == 1 and remaining(local) == [10, 20, 30]


def test_a_step_that_is_not_committed_is_refused_and_nothing_is_deleted(tiers, capsys):
    local, mirror = tiers
    code, _, err = cli(capsys, "prune", local, "--after", "35")
    assert code == 2
    assert f"cannot roll back to step 35 of {local}: it is not a committed checkpoint; nothing deleted" in err
    assert remaining(local) == STEPS and remaining(mirror) == STEPS


def _flip_a_data_byte(checkpoint: Path) -> None:
    data = next(p for p in checkpoint.iterdir() if p.name.startswith("data"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


def test_the_step_rolled_back_to_must_verify_in_one_tier(tiers, capsys):
    local, mirror = tiers
    _flip_a_data_byte(local / step_dir_name(30))
    assert cli(capsys, "prune", local, "--after", "30", "--dry-run")[0] == 0  # the mirror's copy verifies
    _flip_a_data_byte(mirror / step_dir_name(30))
    code, _, err = cli(capsys, "prune", local, "--after", "30")
    assert code == 2
    assert "cannot roll back to step 30" in err
    assert "it does not verify (in the root:" in err and "in the mirror:" in err
    assert remaining(local) == STEPS and remaining(mirror) == STEPS


def test_tagged_steps_above_are_refused_unless_included(tmp_path, capsys):
    local, mirror = tmp_path / "local", tmp_path / "mirror"
    save_run(local, mirror, tags={40: ["best"]})
    code, _, err = cli(capsys, "prune", local, "--after", "30")
    assert code == 2
    assert (
        "tagged checkpoints above step 30: step 40 in the root (best); step 40 in the mirror (best); nothing deleted. "
        "Pass --include-tagged" in err
    )
    assert remaining(local) == STEPS and remaining(mirror) == STEPS
    assert read_manifest(local / step_dir_name(40)).tags == ["best"]
    assert cli(capsys, "prune", local, "--after", "30", "--include-tagged")[0] == 0
    assert remaining(local) == [10, 20, 30] and remaining(mirror) == [10, 20, 30]


def test_refused_while_a_manager_writes_to_the_root(tiers, capsys):
    local, mirror = tiers
    with CheckpointManager(local, mirror=str(mirror)):
        code, _, err = cli(capsys, "prune", local, "--after", "30")
    assert code == 2 and "in use" in err
    assert remaining(local) == STEPS and remaining(mirror) == STEPS


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--after", "30", "--keep-last", "2"], "it takes no retention rule (--keep-last)"),
        (["--keep-last", "2", "--mirror", "x"], "--mirror, --local-only and --include-tagged only go with --after N"),
        (["--after", "30", "--local-only", "--mirror", "x"], "--local-only and --mirror exclude each other"),
        (["--after", "-1"], "a step is in [0, "),
    ],
)
def test_usage_errors(tiers, capsys, argv, message):
    local, mirror = tiers
    code, _, err = cli(capsys, "prune", local, *argv)
    assert code == 2 and message in err
    assert remaining(local) == STEPS and remaining(mirror) == STEPS


def test_a_rollback_with_an_s3_mirror(tmp_path, s3_env, capsys):
    local, url = tmp_path / "local", fresh_s3_url()
    save_run(local, url)
    code, out, err = cli(capsys, "prune", local, "--after", "20")
    assert code == 0, err
    assert remaining(local) == [10, 20]
    code, out, _ = cli(capsys, "ls", url, "--json")
    assert code == 0 and [row["step"] for row in strict_json(out)] == [10, 20]
    assert restored_step(local, url) == 20


# ---- from the training job: CheckpointManager.discard_after -----------------------------------


def open_tiers(local: Path, mirror: Path | str) -> CheckpointManager:
    return CheckpointManager(local, mirror=str(mirror), keep_last=None, mirror_retention={"keep_last": None})


def test_a_job_rolls_back_and_a_crash_resumes_the_new_run(tiers):
    local, mirror = tiers
    with open_tiers(local, mirror) as mgr:
        state = blank()
        assert mgr.restore(state, step=30) == 30
        assert mgr.discard_after(30) == [40, 50]
        assert mgr.steps() == [10, 20, 30]
        assert remaining(local) == [10, 20, 30] and remaining(mirror) == [10, 20, 30]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            mgr.save(40, {"w": torch.full((64,), -40.0), "step": 40})
            mgr.wait(mirror=True)
        assert [str(w.message) for w in seen] == []  # no "saving below the newest step" any more
    assert remaining(mirror) == [10, 20, 30, 40]
    state = blank()
    with CheckpointManager(local, mirror=str(mirror)) as mgr:
        assert mgr.restore(state) == 40
    assert torch.equal(state["w"], torch.full((64,), -40.0))


def test_a_save_above_still_pending_is_deleted_too(tmp_path):
    local = tmp_path / "local"
    with CheckpointManager(local, keep_last=None) as mgr:
        for step in STEPS:
            mgr.save(step, state_of(step))
        handle = mgr.save(60, state_of(60))
        assert mgr.discard_after(20) == [30, 40, 50, 60]
        assert handle.done()
        assert mgr.steps() == [10, 20]
    assert remaining(local) == [10, 20]


def test_a_step_not_committed_in_either_tier_is_refused(tiers):
    local, mirror = tiers
    with open_tiers(local, mirror) as mgr:
        with pytest.raises(
            CheckpointNotFoundError,
            match=r"discard_after\(35\): step 35 cannot be rolled back to in .* or in its mirror: it is not "
            r"committed; nothing deleted",
        ):
            mgr.discard_after(35)
        with pytest.raises(ValueError):
            mgr.discard_after(-1)
    assert remaining(local) == STEPS and remaining(mirror) == STEPS


def test_in_the_job_the_step_rolled_back_to_must_verify_in_one_tier(tiers):
    """A damaged step rolled back to would take every good checkpoint above it and leave none that restores."""
    local, mirror = tiers
    _flip_a_data_byte(local / step_dir_name(30))
    _flip_a_data_byte(mirror / step_dir_name(30))
    with open_tiers(local, mirror) as mgr:
        with pytest.raises(CheckpointDamagedError) as raised:
            mgr.discard_after(30)
    message = str(raised.value)
    assert message.startswith("discard_after(30): step 30 cannot be rolled back to in "), message
    assert "it does not verify (in the root: " in message and "; in the mirror: " in message
    assert "checksum mismatch" in message and message.endswith("; nothing deleted")
    assert remaining(local) == STEPS and remaining(mirror) == STEPS
    shutil.rmtree(mirror / step_dir_name(30))  # the local copy alone, damaged: refused all the same
    with open_tiers(local, mirror) as mgr:
        with pytest.raises(CheckpointDamagedError, match="it does not verify"):
            mgr.discard_after(30)
    assert remaining(local) == STEPS


def test_the_step_may_be_committed_in_the_mirror_only(tiers):
    local, mirror = tiers
    shutil.rmtree(local / step_dir_name(30))  # a node whose local root lost it
    with open_tiers(local, mirror) as mgr:
        assert mgr.discard_after(30) == [40, 50]
    assert remaining(local) == [10, 20] and remaining(mirror) == [10, 20, 30]


def test_tagged_steps_above_are_refused_unless_included_in_the_job(tmp_path):
    local, mirror = tmp_path / "local", tmp_path / "mirror"
    save_run(local, mirror, tags={50: ["best"]})
    with open_tiers(local, mirror) as mgr:
        with pytest.raises(
            CheckpointError,
            match=r"tagged checkpoints above it: step 50 in the root \(best\); "
            r"step 50 in the mirror \(best\); nothing deleted",
        ):
            mgr.discard_after(30)
        assert remaining(local) == STEPS and remaining(mirror) == STEPS
        assert mgr.discard_after(30, include_tagged=True) == [40, 50]
    assert remaining(local) == [10, 20, 30] and remaining(mirror) == [10, 20, 30]


def test_steps_waiting_for_the_mirror_above_are_never_copied(tmp_path, monkeypatch):
    from asyncckpt.engine import mirror as mirror_module

    local, mirror = tmp_path / "local", tmp_path / "mirror"
    gate = threading.Event()
    real_upload = mirror_module._Mirror._upload

    def held_upload(self, step):
        if step == 20:
            gate.wait(30)  # step 20 being copied; 30 and 40 wait behind it
        real_upload(self, step)

    monkeypatch.setattr(mirror_module._Mirror, "_upload", held_upload)
    with CheckpointManager(local, mirror=str(mirror), keep_last=None, mirror_max_behind=5) as mgr:
        mgr.save(10, state_of(10)).wait()
        mgr.wait(mirror=True)
        for step in (20, 30, 40):
            mgr.save(step, state_of(step)).wait()
        threading.Timer(0.5, gate.set).start()  # the copy under way finishes meanwhile
        assert mgr.discard_after(20) == [30, 40]
        mgr.wait(mirror=True)
        assert mgr.stats.summary()["mirror_uploaded"] == 2
    assert remaining(local) == [10, 20] and remaining(mirror) == [10, 20]


@pytest.mark.asyncio
async def test_the_async_manager_rolls_back_too(tiers):
    from asyncckpt import AsyncCheckpointManager

    local, mirror = tiers
    async with AsyncCheckpointManager(local, mirror=str(mirror)) as mgr:
        assert await mgr.restore(blank(), step=20) == 20
        with pytest.raises(CheckpointNotFoundError):
            await mgr.discard_after(25)
        assert await mgr.discard_after(20) == [30, 40, 50]
        assert await mgr.steps() == [10, 20]
    assert remaining(mirror) == [10, 20]


@pytest.mark.parametrize("keep_last", [1, 2])
def test_retention_of_a_save_waited_for_never_deletes_at_or_below_the_step(tmp_path, keep_last):
    """The save of 50 commits inside discard_after: its retention counted 50 and deleted 30 (or,
    with keep_last=1, 40 itself, and the rollback was refused)."""
    with CheckpointManager(tmp_path / "r", keep_last=keep_last) as mgr:
        for step in (30, 40):
            mgr.save(step, state_of(step)).wait()
        mgr.save(50, state_of(50))
        assert mgr.discard_after(40) == [50]
        assert mgr.steps() == [30, 40][-keep_last:]
        mgr.save(45, state_of(45)).wait()  # retention works again afterwards
        assert mgr.steps() == [30, 40, 45][-keep_last:]


def test_the_warning_names_the_rollback_that_keeps_the_new_save(tmp_path):
    with CheckpointManager(tmp_path / "r", keep_last=None) as mgr:
        for step in (40, 50, 60):
            mgr.save(step, state_of(step)).wait()
        mgr.restore(blank(), step=40)
        with pytest.warns(UserWarning, match=r"mgr\.discard_after\(41\) \(it keeps this save"):
            mgr.save(41, state_of(41))
        assert mgr.discard_after(41) == [50, 60]
        assert mgr.steps() == [40, 41]


def test_an_upload_of_a_discarded_step_is_stopped_and_its_failure_never_told(tmp_path):
    from test_mirror import RemoteBackend, copy_held, mirror_steps

    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    remote = RemoteBackend(remote_dir)
    with CheckpointManager(local, mirror=remote, keep_last=None, mirror_max_behind=8) as mgr:
        mgr.save(10, state_of(10))
        mgr.wait(mirror=True)
        remote.release = lambda: mgr._mirror._floor is not None  # the piece under way ends; the copy stops
        copy_held(mgr, remote, 20, state_of(20))  # 20 is being copied
        assert mgr.discard_after(10) == [20]
        remote.gate = None
        remote.down = True
        mgr.save(30, state_of(30)).wait()  # its upload fails: told at the next call, unless discarded
        mgr._mirror.wait(None)
        remote.down = False
        assert mgr.discard_after(10) == [30]
        mgr.save(11, state_of(11))  # no "step 30 was not mirrored" raised here
        mgr.wait(mirror=True)
        assert mgr.stats.summary()["mirror_uploaded"] == 2  # 10 and 11: the copy of 20 was stopped
    assert mirror_steps(remote_dir) == [10, 11] and remaining(local) == [10, 11]


def _unreadable(checkpoint: Path) -> None:
    for manifest in checkpoint.glob("manifest*.json"):
        manifest.write_text("{")


def test_unreadable_manifests_at_or_above_the_step(tmp_path):
    with CheckpointManager(tmp_path / "r", keep_last=None) as mgr:
        for step in STEPS:
            mgr.save(step, state_of(step)).wait()
    _unreadable(tmp_path / "r" / step_dir_name(30))
    _unreadable(tmp_path / "r" / step_dir_name(50))
    with CheckpointManager(tmp_path / "r", keep_last=None) as mgr:
        with pytest.raises(CheckpointNotFoundError, match=r"step 30 cannot be rolled back to .*its manifest cannot"):
            mgr.discard_after(30)
        with pytest.raises(CheckpointError, match=r"step 50 in the root \(its manifest cannot be read: its tags are "):
            mgr.discard_after(20)  # its tags are unknown: kept, as retention keeps it
        assert mgr.steps() == STEPS
        assert mgr.discard_after(20, include_tagged=True) == [30, 40, 50]
    assert remaining(tmp_path / "r") == [10, 20]


def test_a_deletion_that_fails_in_the_root_names_what_went_from_the_mirror(tiers, monkeypatch):
    from asyncckpt.storage.commit import RenameCommit

    local, mirror = tiers
    real, denied = RenameCommit.delete, [True]

    def delete(self, checkpoint):
        if self.backend.root == local and denied[0]:
            raise PermissionError(13, "Permission denied")
        real(self, checkpoint)

    monkeypatch.setattr(RenameCommit, "delete", delete)
    with open_tiers(local, mirror) as mgr:
        with pytest.raises(
            CheckpointError,
            match=r"deleted steps \[40, 50\] from the mirror, then in the root of .*"
            r"failed deleting step 50 \(.*Permission denied",
        ):
            mgr.discard_after(30)
        assert remaining(mirror) == [10, 20, 30] and remaining(local) == STEPS
        denied[0] = False
        assert mgr.discard_after(30) == [40, 50]  # again: it finishes
    assert remaining(local) == [10, 20, 30] and remaining(mirror) == [10, 20, 30]


def test_a_save_another_thread_is_snapshotting_is_waited_for_and_deleted(tmp_path, monkeypatch):
    from asyncckpt import _phases

    with CheckpointManager(tmp_path / "r", keep_last=None) as mgr:
        for step in (40, 50):
            mgr.save(step, state_of(step)).wait()
        monkeypatch.setitem(_phases._DELAYS, "snapshot", 0.5)
        other = threading.Thread(target=mgr.save, args=(60, state_of(60)))
        other.start()
        while not mgr._admission._reservations:  # the other thread's save is under way
            threading.Event().wait(0.01)
        assert mgr.discard_after(40) == [50, 60]
        other.join()
        mgr.wait()
        assert mgr.steps() == [40]


def test_a_job_on_an_s3_root_rolls_back(s3_env):
    url = fresh_s3_url()
    with CheckpointManager(url, keep_last=None) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, state_of(step)).wait()
        mgr.restore(blank(), step=10)
        assert mgr.discard_after(10) == [20, 30]
        assert mgr.steps() == [10]
    state = blank()
    with CheckpointManager(url) as mgr:
        assert mgr.restore(state) == 10
    assert torch.equal(state["w"], state_of(10)["w"])
