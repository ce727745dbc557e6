"""Data loss and silent wrongness of s3:// roots, against the real server (the session's
``s3_server``, ``weed mini`` on 127.0.0.1): what readers see of emptied step prefixes, and what a
SIGKILL at each point of a re-save, a retention delete or a tag change leaves."""

from __future__ import annotations

import json
import textwrap
import time
import warnings

import pytest
import torch

import asyncckpt
from _kill import kill_when
from asyncckpt.cli.commands import main as cli_main
from asyncckpt.engine.reader import read_manifest
from asyncckpt.errors import RootInUseError
from asyncckpt.storage.backend import CheckpointRef
from asyncckpt.storage.commit import ManifestLastCommit, published_checkpoints
from asyncckpt.storage.objectstore import ObjectStoreBackend
from conftest import fresh_s3_url


def _state(step: int, version: int = 0) -> dict:
    gen = torch.Generator().manual_seed(step * 10 + version)
    return {"x": torch.randn(50_000, generator=gen), "step": step, "version": version}


def _empty_prefix(backend: ObjectStoreBackend, step_name: str) -> None:
    """Leave ``step_name/`` as a store with directories keeps it after its last object is deleted
    (SeaweedFS lists it as a common prefix): what a delete cut short between removing the objects
    and removing the directory leaves, or a user's ``aws s3 rm --recursive``."""
    name = f"{step_name}/data-00000-0123456789abcdef.bin"
    backend.write_small(name, b"x" * 10)
    backend._client.delete([name])
    assert any(e.name == step_name and e.is_dir for e in backend.list("")), "the store does not keep emptied prefixes"


def test_an_empty_step_prefix_is_no_checkpoint_for_readers(s3_server, s3_env, capsys):
    """An emptied ``step-N/`` prefix holds nothing: it is not listed, not reported damaged or gone,
    and never stops ``load`` from reading the newest checkpoint that verifies."""
    url = fresh_s3_url()
    with asyncckpt.CheckpointManager(url) as mgr:
        mgr.save(4, _state(4)).wait()
    backend = ObjectStoreBackend(url)
    _empty_prefix(backend, "step-000000000003")
    _empty_prefix(backend, "step-000000000005")

    assert [c.step for c in published_checkpoints(backend)] == [4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert asyncckpt.load(url)["x"].equal(_state(4)["x"])
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match=r"no checkpoint for step 5 .*committed steps: \[4\]"):
        asyncckpt.load(url, 5)
    capsys.readouterr()
    assert cli_main(["ls", "--json", url]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r.get("step") for r in rows] == [4], rows
    assert cli_main(["verify", url]) == 0
    out = capsys.readouterr().out
    assert "step-000000000003" not in out and "step-000000000005" not in out, out
    # the next writer's sweep removes the empty prefixes and touches nothing else
    with asyncckpt.CheckpointManager(url) as mgr:
        assert mgr.steps() == [4]
    assert [e.name for e in backend.list("") if e.is_dir] == ["step-000000000004"]
    assert [c.step for c in ManifestLastCommit(backend).checkpoints()] == [4]


# ---- SIGKILL at each point of a re-save, a retention delete and a tag change ---------------------------

_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import asyncckpt
    from asyncckpt.storage import objectstore

    url, action, target, when, nth, mark = sys.argv[1:7]

    def content(step, version=0):
        gen = torch.Generator().manual_seed(step * 10 + version)
        return {"x": torch.randn(50_000, generator=gen), "step": step, "version": version}

    mgr = asyncckpt.CheckpointManager(
        url, keep_last=2, compression=None, chunk_size=1 << 16, storage_options={"lease_seconds": 1}
    )
    for step in (1, 2, 3):
        mgr.save(step, content(step)).wait()

    # the kill point: before or after the nth call (from here on) of one backend or client method
    owner_name, method = target.split(".")
    owner = getattr(objectstore, owner_name)
    original = getattr(owner, method)
    calls = [0]

    def stop():
        with open(mark, "a") as f:
            f.write("here\\n")
        time.sleep(600)

    def hooked(self, *args, **kwargs):
        calls[0] += 1
        if when == "before" and calls[0] == int(nth):
            stop()
        result = original(self, *args, **kwargs)
        if when == "after" and calls[0] == int(nth):
            stop()
        return result

    setattr(owner, method, hooked)
    if action == "resave":
        mgr.save(3, content(3, 1)).wait()
    elif action == "retention":
        mgr.save(4, content(4)).wait()  # keep_last=2: step 2 goes
    elif action == "tag":
        mgr.tag(3, "best")
    print("the kill point was never reached", flush=True)
    time.sleep(600)
    """
)

# (action, method, before/after, nth call): the steps then committed, and step 3's version and tags
_KILLS = {
    "retention-manifest-deleted": (("retention", "ObjectStoreBackend.delete", "after", 1), [3, 4], 0, []),
    "retention-objects-deleted": (("retention", "_ObstoreClient.delete_dirs", "before", 1), [3, 4], 0, []),
    "resave-manifest-written": (("resave", "ObjectStoreBackend.write_small", "after", 1), [2, 3], 1, []),
    "resave-old-manifest-deleted": (("resave", "ObjectStoreBackend.delete", "after", 1), [2, 3], 1, []),
    "resave-old-data-deleted": (("resave", "ObjectStoreBackend.delete", "after", 2), [2, 3], 1, []),
    "tag-manifest-written": (("tag", "ObjectStoreBackend.write_small", "after", 1), [2, 3], 0, ["best"]),
    "tag-old-manifest-deleted": (("tag", "ObjectStoreBackend.delete", "after", 1), [2, 3], 0, ["best"]),
}


def _kill_at(tmp_path, env: dict, url: str, point: tuple) -> None:
    mark = tmp_path / "mark"
    kill_when([_CHILD, url, *map(str, point), str(mark)], mark.exists, "the kill point", env)


def _open_when_the_lease_expires(url: str) -> asyncckpt.CheckpointManager:
    """The dead writer's lease (1 s) runs out; until then the root is refused, as it should be."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return asyncckpt.CheckpointManager(url, keep_last=2)
        except RootInUseError:
            assert time.monotonic() < deadline, "the dead writer's lease never expired"
            time.sleep(0.2)


@pytest.mark.parametrize("case", list(_KILLS))
def test_a_kill_in_a_resave_retention_or_tag_leaves_only_whole_steps(tmp_path, s3_server, s3_env, case):
    point, expected, version, tags = _KILLS[case]
    url = fresh_s3_url()
    _kill_at(tmp_path, s3_server.env, url, point)
    backend = ObjectStoreBackend(url, s3_server.storage_options)

    # before any writer sweeps: readers see only whole steps, each bit-exact, nothing damaged
    assert [c.step for c in published_checkpoints(backend)] == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in expected:
            loaded = asyncckpt.load(url, step, storage_options=s3_server.storage_options)
            want = version if step == 3 else 0
            assert loaded["version"] == want and loaded["x"].equal(_state(step, want)["x"]), (step, loaded["version"])
        newest = asyncckpt.load(url, storage_options=s3_server.storage_options)
        assert newest["step"] == expected[-1]
    assert read_manifest(CheckpointRef(backend, "step-000000000003")).tags == tags

    # the next writer sweeps what the dead one left, and nothing else
    with _open_when_the_lease_expires(url) as mgr:
        assert mgr.steps() == expected
        for step in expected:
            name = f"step-{step:012d}"
            files = sorted(e.name for e in backend.list(name))
            manifest = read_manifest(CheckpointRef(backend, name))
            data = sorted({c.file for c in manifest.chunks})
            assert [f for f in files if f.startswith("data-")] == data, files
            assert len([f for f in files if f.startswith("manifest")]) == 1, files
        assert sorted(e.name for e in backend.list("") if e.is_dir) == [f"step-{s:012d}" for s in expected]
        assert read_manifest(CheckpointRef(backend, "step-000000000003")).tags == tags
        mgr.save(9, _state(9)).wait()
    assert asyncckpt.load(url, storage_options=s3_server.storage_options)["x"].equal(_state(9)["x"])


# ---- the 10,000 parts of a multipart upload ----------------------------------------------------------


def test_a_data_object_beyond_the_part_limit_fails_at_the_append_naming_it(s3_server, monkeypatch):
    """S3 takes at most 10,000 parts: with parts of ``part_size`` an object larger than their product
    fails. The stream says so at the append that crosses the limit (naming the object, the limit and
    the option), and leaves no object. (The limit is lowered to 3 parts to show it with 16 MiB.)"""
    from asyncckpt.storage import objectstore

    monkeypatch.setattr(objectstore, "_MAX_PARTS", 3)
    backend = ObjectStoreBackend(fresh_s3_url(), {**s3_server.storage_options, "part_size": 5 << 20})
    stream = backend.open_write("step-000000000001/data-00000-0123456789abcdef.bin")
    block = bytes(4 << 20)
    with pytest.raises(asyncckpt.CheckpointError, match=r"data-00000-0123456789abcdef\.bin.*3 parts.*part_size"):
        for _ in range(4):
            stream.append(block)
    stream.abort()
    assert backend.stat("step-000000000001/data-00000-0123456789abcdef.bin") is None


def test_the_expected_size_grows_the_parts(s3_server, monkeypatch):
    """A writer that says how large the object will be gets parts large enough for it (the save
    passes its raw size), and the object reads back equal."""
    from asyncckpt.storage import objectstore

    monkeypatch.setattr(objectstore, "_MAX_PARTS", 3)
    url = fresh_s3_url()
    backend = ObjectStoreBackend(url, {**s3_server.storage_options, "part_size": 5 << 20})
    payload = torch.randint(0, 255, (24 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    data = payload.numpy().tobytes()
    stream = backend.open_write("blob.bin", size_hint=len(data))
    for i in range(0, len(data), 3 << 20):
        stream.append(data[i : i + (3 << 20)])
    stream.finish()
    assert backend.read_small("blob.bin", len(data)) == data
    # and a manager's save of a state that needs more than 3 default parts commits and reads back
    state = {"x": torch.randn(6 << 20, generator=torch.Generator().manual_seed(2))}  # 24 MiB raw
    root = fresh_s3_url()
    options = {**s3_server.storage_options, "part_size": 5 << 20}
    with asyncckpt.CheckpointManager(root, compression=None, storage_options=options) as mgr:
        mgr.save(1, state).wait()
    assert asyncckpt.load(root, storage_options=options)["x"].equal(state["x"])
