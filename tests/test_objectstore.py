"""The object-store backend against a real S3 server (``weed mini`` on 127.0.0.1, the session's
``s3_server``), through obstore and through fsspec (s3fs, and fsspec's in-process ``memory://``)."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import asyncckpt
from asyncckpt.errors import CheckpointError, RootInUseError, StorageError
from asyncckpt.storage.backend import Entry, ObjectInfo, open_backend
from asyncckpt.storage.commit import ManifestLastCommit, open_storage
from asyncckpt.storage.objectstore import LEASE_NAME, ObjectStoreBackend
from conftest import fresh_s3_url

MiB = 1 << 20


@pytest.fixture(params=["obstore", "s3fs", "memory"])
def make(request, s3_server):
    """Factory: ``make(**options)`` -> a backend on a fresh root of one of the three clients."""
    made = []
    url = f"memory://ckpt/t-{secrets.token_hex(6)}" if request.param == "memory" else fresh_s3_url()

    def factory(url=url, **options):
        if request.param != "memory":
            options = {**s3_server.storage_options, **options}
        if request.param == "s3fs":
            options["client"] = "fsspec"
        backend = ObjectStoreBackend(url, options)
        made.append(backend)
        return backend

    factory.kind = request.param
    yield factory
    for backend in made:
        backend.close()


def _s3(s3_server, url=None, **options):
    return ObjectStoreBackend(url or fresh_s3_url(), {**s3_server.storage_options, **options})


# ---- writing and reading -------------------------------------------------------------------------


def test_a_streamed_write_reads_back_bit_exact_by_ranges(make):
    backend = make()
    size = 40 * MiB if make.kind != "memory" else 12 * MiB
    payload = os.urandom(size)
    piece = bytearray(3 * MiB + 17)  # one buffer, reused for every append as the writer does
    stream = backend.open_write("step-000000000001/data-00000-0123456789abcdef.bin")
    offsets = []
    for start in range(0, size, len(piece)):
        n = min(len(piece), size - start)
        piece[:n] = payload[start : start + n]
        offsets.append(stream.append(memoryview(piece)[:n]))
    stream.finish()
    assert offsets == list(range(0, size, len(piece)))
    handle = backend.open_read("step-000000000001/data-00000-0123456789abcdef.bin")
    assert handle.size == size and handle.fileno() is None
    got = bytearray(size)
    view = memoryview(got)
    at = 0
    while at < size:
        n = handle.read_into(view[at : at + 5 * MiB + 3], at)
        assert n > 0
        at += n
    assert bytes(got) == payload
    tail = bytearray(100)
    assert handle.read_into(memoryview(tail), size - 10) == 10 and bytes(tail[:10]) == payload[-10:]
    assert handle.read_into(memoryview(tail), size) == 0
    handle.close()


def test_an_aborted_write_leaves_no_object(make, s3_server):
    backend = make()
    stream = backend.open_write("step-000000000001/data-00000-aaaaaaaaaaaaaaaa.bin")
    stream.append(os.urandom(20 * MiB))  # parts already uploaded
    stream.abort()
    stream.abort()  # never raises, also twice
    assert backend.stat("step-000000000001/data-00000-aaaaaaaaaaaaaaaa.bin") is None
    assert backend.list("step-000000000001") == []
    if make.kind != "memory":
        import s3fs

        fs = s3fs.S3FileSystem(
            key=s3_server.storage_options["key"],
            secret=s3_server.storage_options["secret"],
            endpoint_url=s3_server.endpoint,
            skip_instance_cache=True,
        )
        prefix = backend.location.removeprefix("s3://ckpt/")
        assert [u for u in fs.list_multipart_uploads("ckpt") if u["Key"].startswith(prefix)] == []


def test_write_small_creates_only(make):
    backend = make()
    backend.write_small("step-000000000001/manifest-000000000001.json", b"first")
    with pytest.raises(CheckpointError, match=r"manifest-000000000001\.json exists"):
        backend.write_small("step-000000000001/manifest-000000000001.json", b"second")
    assert backend.read_small("step-000000000001/manifest-000000000001.json", 100) == b"first"
    backend.sync("step-000000000001")  # nothing to do, and no error


def test_open_write_refuses_an_existing_name(make):
    backend = make()
    backend.write_small("a/data.bin", b"x")
    with pytest.raises(CheckpointError, match="data.bin exists"):
        backend.open_write("a/data.bin")


def test_read_small_refuses_beyond_the_limit_and_names_a_missing_object(make):
    backend = make()
    backend.write_small("m.json", b"x" * 1000)
    with pytest.raises(CheckpointError, match="is 1000 bytes, larger than the 999 limit"):
        backend.read_small("m.json", 999)
    with pytest.raises(CheckpointError, match=f"{backend.location}/missing.json does not exist"):
        backend.read_small("missing.json", 10)
    with pytest.raises(CheckpointError, match="missing.bin does not exist"):
        backend.open_read("missing.bin")


def test_list_stat_identity_and_deletes(make):
    backend = make()
    assert backend.list() == [] and backend.stat("step-000000000001") is None
    assert backend.identity("step-000000000001") is None
    backend.write_small("step-000000000001/manifest-000000000001.json", b"m1")
    backend.write_small("step-000000000001/data-00000-aaaaaaaaaaaaaaaa.bin", b"data")
    backend.write_small("step-000000000001/sub/deep.bin", b"deep")
    backend.write_small("top.txt", b"t")
    assert sorted(backend.list(), key=lambda e: e.name) == [Entry("step-000000000001", True), Entry("top.txt", False)]
    assert sorted(backend.list("step-000000000001"), key=lambda e: e.name) == [
        Entry("data-00000-aaaaaaaaaaaaaaaa.bin", False),
        Entry("manifest-000000000001.json", False),
        Entry("sub", True),
    ]
    assert backend.stat("step-000000000001") == ObjectInfo("dir", 0)
    assert backend.stat("step-000000000001/data-00000-aaaaaaaaaaaaaaaa.bin") == ObjectInfo("file", 4)
    assert backend.stat("step-000000000001/nothing") is None
    assert backend.stat("step-00000000000") is None  # a prefix of a name is no directory
    assert backend.describe("top.txt") == f"{backend.location}/top.txt"

    before = backend.identity("step-000000000001")
    object_before = backend.identity("top.txt")
    assert before is not None and object_before is not None
    assert backend.identity("step-000000000001") == before
    # the step saved again: a new manifest generation, the old one removed
    backend.write_small("step-000000000001/manifest-000000000002.json", b"m2")
    backend.delete("step-000000000001/manifest-000000000001.json")
    resaved = backend.identity("step-000000000001")
    assert resaved != before
    # deleted and re-created with the same manifest name
    backend.delete_tree("step-000000000001")
    assert backend.stat("step-000000000001") is None and backend.identity("step-000000000001") is None
    backend.write_small("step-000000000001/manifest-000000000002.json", b"m2 again")
    assert backend.identity("step-000000000001") not in (None, resaved)
    backend.delete("top.txt")
    backend.delete("top.txt")  # missing is fine
    assert backend.identity("top.txt") is None


def test_a_listing_longer_than_one_page_is_whole(s3_server):
    """S3 answers a listing 1000 keys a page; the backend follows the continuation."""
    backend = _s3(s3_server)
    names = [f"many/obj-{i:05d}" for i in range(1105)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: backend.write_small(n, b"x"), names))
    assert sorted(e.name for e in backend.list("many")) == sorted(n.split("/")[1] for n in names)
    backend.delete_tree("many")
    assert backend.list("many") == [] and backend.stat("many") is None


def test_a_replaced_object_fails_a_read_begun_on_the_old_version(s3_server):
    backend = _s3(s3_server)
    backend.write_small("obj.bin", b"a" * 100)
    handle = backend.open_read("obj.bin")
    backend.delete("obj.bin")
    backend.write_small("obj.bin", b"b" * 100)
    with pytest.raises(OSError, match="obj.bin"):
        handle.read_into(memoryview(bytearray(10)), 0)


# ---- the lease -----------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(make):
    first = make()
    first.lock()
    second = make(url=first.location)
    with pytest.raises(RootInUseError) as err:
        second.lock()
    assert socket.gethostname() in str(err.value) and f"pid {os.getpid()}" in str(err.value)
    assert LEASE_NAME in str(err.value)
    first.check_lock()
    first.close()
    second.lock()  # released: the next writer takes it
    second.check_lock()
    second.close()
    assert first.stat(LEASE_NAME) is None


def test_an_expired_lease_is_taken_over(s3_server):
    url = fresh_s3_url()
    dead = {"host": "gone-host", "pid": 4242, "token": "0" * 16, "expires": time.time() - 3600, "ttl": 60}
    raw = ObjectStoreBackend(url, s3_server.storage_options)
    raw.write_small(LEASE_NAME, json.dumps(dead).encode())
    writer = _s3(s3_server, url)
    writer.lock()  # the dead writer's lease expired an hour ago
    holder = json.loads(writer.read_small(LEASE_NAME, 1000))
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    writer.close()


def test_a_writer_that_stops_renewing_loses_the_root_to_the_next(s3_server):
    url = fresh_s3_url()
    stalled = _s3(s3_server, url, lease_seconds=1)
    stalled.lock()
    stalled._lease._stop.set()  # its renewal thread stops, as if the process hung
    stalled._lease._thread.join()
    successor = _s3(s3_server, url, lease_seconds=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            successor.lock()
            break
        except RootInUseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with pytest.raises(RootInUseError, match="lost checkpoint root .*taken over"):
        stalled.check_lock()
    stalled.close()  # does not delete the successor's lease
    successor.check_lock()
    successor.close()


def test_renewal_keeps_the_lease(s3_server):
    url = fresh_s3_url()
    writer = _s3(s3_server, url, lease_seconds=1.5)
    writer.lock()
    first = writer.identity(LEASE_NAME)
    deadline = time.monotonic() + 20
    while writer.identity(LEASE_NAME) == first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert writer.identity(LEASE_NAME) != first  # renewed (overwritten by its own writer)
    writer.check_lock()
    with pytest.raises(RootInUseError):
        _s3(s3_server, url).lock()
    writer.close()


@pytest.mark.parametrize("seen_by", ["a publish", "the next renewal"])
def test_a_lease_version_holding_this_writer_s_token_is_its_own(s3_server, seen_by):
    """A renewal the store applied though its answer was lost (a timeout; a retried put then gets
    412) left a version of the lease this writer did not expect, with its own token in it: it was
    taken for another writer's takeover, every later publish failed, and the lease was never
    released (a restarted job was refused until it expired)."""
    url = fresh_s3_url()
    writer = _s3(s3_server, url, lease_seconds=1.5 if seen_by == "the next renewal" else 60)
    writer.lock()
    store = _s3(s3_server, url)  # the store's side of the lost answer: the same body, a new version
    record = json.loads(store.read_small(LEASE_NAME, 1000))
    record["expires"] = time.time() + 60
    store._client.put(LEASE_NAME, json.dumps(record).encode())  # an overwrite, as a renewal's
    if seen_by == "the next renewal":
        time.sleep(1.5)  # a renewal or two meet the unexpected version
    writer.check_lock()
    writer.write_small("after.bin", b"published")
    writer.close()
    assert store.stat(LEASE_NAME) is None  # released as its own
    _s3(s3_server, url).lock()  # the next job opens the root at once


def test_check_lock_raises_once_another_writer_replaced_the_lease(make):
    writer = make()
    writer.lock()
    other = make(url=writer.location)
    other.delete(LEASE_NAME)
    other.write_small(LEASE_NAME, json.dumps({"host": "h2", "pid": 7, "expires": time.time() + 60}).encode())
    with pytest.raises(RootInUseError, match="taken over by another writer"):
        writer.check_lock()
    writer.close()
    assert json.loads(other.read_small(LEASE_NAME, 1000))["host"] == "h2"  # not deleted by the loser


def test_a_writer_that_lost_its_lease_publishes_nothing(s3_server):
    url = fresh_s3_url()
    protocol = open_storage(url, storage_options=s3_server.storage_options)
    assert isinstance(protocol, ManifestLastCommit)
    backend = protocol.backend
    staging = protocol.begin(7)
    stream = backend.open_write(staging.object_name(staging.data_name(0)))
    stream.append(b"data")
    stream.finish()
    backend.delete(LEASE_NAME)
    backend.write_small(LEASE_NAME, json.dumps({"host": "h2", "pid": 7, "expires": time.time() + 60}).encode())
    with pytest.raises(RootInUseError):
        protocol.publish(staging, b"a manifest")
    assert not any(e.name.startswith("manifest") for e in backend.list("step-000000000007"))
    protocol.abort(staging)
    protocol.close()


# ---- configuration and errors ---------------------------------------------------------------------


def test_the_standard_environment_is_enough(s3_env):
    backend = open_backend(fresh_s3_url())
    assert isinstance(backend, ObjectStoreBackend)
    backend.lock()
    backend.write_small("x.bin", b"hello")
    assert backend.read_small("x.bin", 10) == b"hello"
    backend.close()


def test_wrong_credentials_are_a_clear_error_at_open(s3_server):
    backend = _s3(s3_server, secret="not-the-secret")
    with pytest.raises(CheckpointError, match="access denied, check credentials"):
        backend.lock()
    with pytest.raises(CheckpointError, match="access denied"):
        backend.list()


def test_a_missing_bucket_is_a_clear_error(s3_server):
    backend = _s3(s3_server, "s3://no-such-bucket/ckpts")
    with pytest.raises(CheckpointError, match="bucket 'no-such-bucket' does not exist"):
        backend.lock()
    with pytest.raises(CheckpointError, match="s3://no-such-bucket/ckpts: cannot list: bucket 'no-such-bucket'"):
        backend.list()


def test_an_unreachable_endpoint_is_an_error_within_the_timeouts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "k",
        "secret": "s",
        "region": "us-east-1",
        "connect_timeout": 0.5,
        "timeout": 1,
        "retries": 1,
    }
    backend = ObjectStoreBackend("s3://ckpt/x", options)
    with pytest.raises(CheckpointError, match="cannot be reached"):
        backend.lock()
    with pytest.raises(CheckpointError, match=f"127.0.0.1:{port}"):
        backend.list()


@pytest.mark.parametrize("url", ["nosuch://bucket/ckpts", "hdfs://nn/ckpts"])
def test_a_scheme_without_a_backend_names_it(url):
    with pytest.raises(CheckpointError, match=f"no storage backend for scheme '{url.split(':')[0]}'"):
        open_backend(url)


@pytest.mark.parametrize("url", ["s3://ckpt/exp#1", "s3://ckpt/exp?v=2", "s3://ckpt/exp#", "s3://ckpt/run?"])
def test_a_root_whose_key_a_url_parser_would_cut_is_refused(url):
    """Roots that differ after a '#' or '?' would share one prefix: one run would restore, and
    delete, another's checkpoints."""
    with pytest.raises(CheckpointError, match=r"an object store root cannot hold '\?' or '#'"):
        open_backend(url)
    with pytest.raises(CheckpointError, match="cannot hold"):
        asyncckpt.CheckpointManager(url)


@pytest.mark.parametrize("url", ["s3://ckpt/a/../b", "s3://ckpt/./b", "s3://ckpt/a/.."])
def test_dot_segments_in_a_root_are_refused(url):
    with pytest.raises(CheckpointError, match="'.' and '..' are not resolved"):
        open_backend(url)


def test_bad_options_are_refused():
    with pytest.raises(CheckpointError, match="timeout"):
        ObjectStoreBackend("s3://b/p", {"timeout": "soon"})
    with pytest.raises(CheckpointError, match="cannot configure"):
        ObjectStoreBackend("s3://b/p", {"no_such_option": 1})
    with pytest.raises(CheckpointError, match="storage_options apply to object-store URLs"):
        open_backend("/tmp/somewhere", storage_options={"key": "k"})


@pytest.mark.parametrize(
    ("option", "value"),
    [("part_size", "8MiB"), ("part_size", None), ("upload_concurrency", "eight"), ("retries", "3x")],
)
def test_a_count_option_that_is_no_number_is_refused_naming_it(option, value):
    # a user writes part_size="8MiB" as s3fs's block sizes are sometimes written: a CheckpointError
    # naming the option, not a bare ValueError from int()
    with pytest.raises(CheckpointError, match=f"storage option {option}={value!r} is not a whole number"):
        ObjectStoreBackend("s3://b/p", {option: value})


@pytest.mark.parametrize(
    ("url", "missing", "extra"), [("s3://b/p", "obstore", "s3"), ("memory://b/p", "fsspec", "fsspec")]
)
def test_a_missing_client_package_names_the_extra_to_install_quoted(monkeypatch, url, missing, extra):
    # quoted, so the line pastes into zsh too (unquoted, zsh reads [s3] as a glob: "no matches found")
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if it were not installed
    with pytest.raises(CheckpointError, match=re.escape(f'pip install "asyncckpt[{extra}]"')):
        open_backend(url)


def test_open_backend_dispatches_urls(s3_server):
    backend = open_backend("memory://ckpt/x")
    assert isinstance(backend, ObjectStoreBackend) and backend.location == "memory://ckpt/x"
    assert backend.capabilities.atomic_rename is False and backend.capabilities.lock is True
    s3 = open_backend("s3://ckpt/y", storage_options=s3_server.storage_options)
    assert s3.describe("step-000000000001/manifest-000000000001.json") == (
        "s3://ckpt/y/step-000000000001/manifest-000000000001.json"
    )


def test_a_manager_saves_to_an_s3_root_and_load_reads_it_bit_exact(s3_env, s3_server):
    """End to end: a committed step whose manifest verifies, the lease released, read back equal
    (through the environment and through explicit storage_options)."""
    import torch

    import asyncckpt
    from asyncckpt.storage.commit import newest_manifest

    url = fresh_s3_url()
    state = {"w": torch.randn(300, 100), "step": 3}
    manager = asyncckpt.CheckpointManager(url)
    manager.save(3, state)
    manager.wait()
    manager.close()
    backend = ObjectStoreBackend(url)
    assert [c.step for c in ManifestLastCommit(backend).checkpoints()] == [3]
    assert newest_manifest(backend, "step-000000000003") is not None
    assert backend.stat(LEASE_NAME) is None
    second = asyncckpt.CheckpointManager(url)  # the root is free again, and its sweep keeps step 3
    second.close()
    assert [c.step for c in ManifestLastCommit(backend).checkpoints()] == [3]
    loaded = asyncckpt.load(url)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], state["w"])
    loaded = asyncckpt.load(url, 3, storage_options=s3_server.storage_options)
    assert torch.equal(loaded["w"], state["w"])


def test_a_dead_writer_with_a_short_lease_is_taken_over_by_its_own_margin(s3_server):
    """The takeover margin is the holder's (a quarter of the ttl it recorded): a writer with the
    default 60 s lease does not wait 15 s past the expiry of a dead 2 s lease."""
    url = fresh_s3_url()
    dead = {"host": "gone-host", "pid": 4242, "token": "0" * 16, "expires": time.time() - 1.0, "ttl": 2}
    raw = ObjectStoreBackend(url, s3_server.storage_options)
    raw.write_small(LEASE_NAME, json.dumps(dead).encode())
    writer = _s3(s3_server, url)  # default lease_seconds=60: its own margin would be 15 s
    writer.lock()  # expired 1 s ago, past the holder's 0.5 s margin
    assert json.loads(writer.read_small(LEASE_NAME, 1000))["pid"] == os.getpid()
    writer.close()


def test_a_live_lease_within_the_holders_margin_is_still_refused(s3_server):
    url = fresh_s3_url()
    dead = {"host": "gone-host", "pid": 4242, "token": "0" * 16, "expires": time.time() - 1.0, "ttl": 60}
    raw = ObjectStoreBackend(url, s3_server.storage_options)
    raw.write_small(LEASE_NAME, json.dumps(dead).encode())
    with pytest.raises(RootInUseError, match="gone-host"):
        _s3(s3_server, url, lease_seconds=2).lock()  # the holder's margin is 15 s, not the taker's 0.5 s


def test_a_duration_in_a_network_error_is_not_read_as_a_denied_status():
    """obstore's messages carry durations ("in 100.724013ms"): a bare 401 or 403 in them is no
    HTTP status, and an unreachable store must not be reported as wrong credentials."""
    backend = ObjectStoreBackend(
        "s3://bucket/prefix", {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}
    )
    cause = RuntimeError("Generic S3 error: Error after 3 retries in 100.724013ms, source: error sending request")
    with pytest.raises(StorageError, match="cannot be reached") as info:
        backend._fail(cause, "step-000000000001/data.bin", "read")
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, OSError)
    assert "access denied" not in str(info.value)
    denied = RuntimeError("Server returned non-2xx status code: 403 Forbidden")
    with pytest.raises(CheckpointError, match="access denied"):
        backend._fail(denied, "x", "read")


def test_a_writer_that_closed_the_root_publishes_nothing_more(s3_server):
    """A thread still publishing after close() (a mirror upload close gave up on) must not write
    a manifest into a root whose lease this writer released."""
    url = fresh_s3_url()
    backend = _s3(s3_server, url)
    backend.lock()
    backend.check_lock()
    backend.close()
    with pytest.raises(RootInUseError, match="closed by this writer"):
        backend.check_lock()
    backend.lock()  # opened again: its own once more
    backend.check_lock()
    backend.close()
