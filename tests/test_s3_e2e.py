"""End to end on ``s3://`` roots against a real S3 server (``weed mini`` on 127.0.0.1, the session's
``s3_server``; a test that stops its server starts one of its own).

What a user sees: saves and restores bit-exact through ``CheckpointManager("s3://...")``, retention
as objects gone from the bucket, ``load``/``load_weights`` (the latter fetching only the model's
ranges), a re-saved step, a second writer refused, a corrupted object found by ``verify`` and skipped
by ``restore``, the server stopped and restarted during a save, and the command line as a
subprocess given only the standard environment. The bucket is listed and written with obstore
directly (tests/_s3bucket.py), never through asyncckpt. SIGKILL of a saving process: tests/test_s3_kill.py.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import torch

import _s3server
import asyncckpt
from _cli import cli
from _overlap_state import plain
from _s3bucket import get_object, objects, put_object, stored_steps
from _trees import assert_same_tree, same_tree
from asyncckpt import CheckpointError, CheckpointManager, RootInUseError
from asyncckpt.engine.reader import read_manifest
from asyncckpt.format import step_dir_name
from asyncckpt.storage.catalog import Catalog
from asyncckpt.storage.commit import published_checkpoints
from asyncckpt.storage.objectstore import LEASE_NAME, ObjectStoreBackend
from conftest import fresh_s3_url

# ---- training state ---------------------------------------------------------------------------------


def advance(setup, step: int) -> dict:
    """One training step, the plain ints and the RNG updated as a loop would; returns a deep copy
    of the whole state as plain state dicts (what a checkpoint of it must hold)."""
    setup.train_step(step % len(setup.data))
    setup.state["step"] = step
    setup.state["rng"] = torch.get_rng_state()
    setup.state["extra"] = {"epoch": step // 2, "note": f"after {step}"}
    return plain(setup.state)


@pytest.fixture
def url(s3_server, s3_env) -> str:
    """A fresh root on the shared server, its endpoint and credentials in the environment."""
    return fresh_s3_url()


# ---- 1. save and restore ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", None])
def test_save_restore_load_bit_exact_with_retention_as_objects_gone(s3_server, url, make_training, compression):
    setup = make_training(0, 12)
    saved = {}
    with CheckpointManager(url, keep_last=2, compression=compression) as mgr:
        assert mgr.root == url
        for step in (1, 2, 3, 4):
            saved[step] = advance(setup, step)
            mgr.save(step, setup.state, metrics={"loss": 1.0 / step}).wait()
        assert mgr.steps() == [3, 4]
        assert LEASE_NAME in objects(s3_server, url)  # the writer's lease, while it writes

    # retention removed steps 1 and 2 from the bucket, manifests and data alike; close the lease
    stored = objects(s3_server, url)
    assert stored_steps(s3_server, url) == [3, 4]
    assert LEASE_NAME not in stored
    for step in (3, 4):
        names = [n.split("/", 1)[1] for n in stored if n.startswith(step_dir_name(step) + "/")]
        assert [n for n in names if n.startswith("manifest-")] == ["manifest-000000000001.json"], names
        assert any(n.startswith("data-") for n in names), names

    other = make_training(1, 12)  # other initial weights: a restore that did nothing would show
    with CheckpointManager(url, keep_last=2, compression=compression) as mgr:
        assert mgr.restore(other.state) == 4
        assert_same_tree(saved[4], plain(other.state))
        assert mgr.restore(other.state, step=3) == 3
        assert_same_tree(saved[3], plain(other.state))

    assert_same_tree(saved[4], asyncckpt.load(url))
    assert_same_tree(saved[3], asyncckpt.load(f"{url}/{step_dir_name(3)}"))
    assert_same_tree(saved[3], asyncckpt.load(url, step=3))
    model = make_training(2, 12).model
    assert asyncckpt.load_weights(url, model) == 4
    assert_same_tree(saved[4]["model"], plain({"model": model})["model"])


def test_resaving_an_existing_step_replaces_it_and_leaves_no_old_object(s3_server, url, make_training):
    setup = make_training(0, 12)
    with CheckpointManager(url, keep_last=None) as mgr:
        first = advance(setup, 1)
        mgr.save(1, setup.state).wait()
        old = set(objects(s3_server, url))
        second = advance(setup, 2)
        mgr.save(1, setup.state).wait()  # the same step again, new content
        assert mgr.steps() == [1]
    assert not same_tree(first["model"], second["model"])
    now = set(objects(s3_server, url))
    assert not (old & now), f"objects of the superseded version remain: {sorted(old & now)}"
    assert [n for n in now if "manifest-" in n] == [f"{step_dir_name(1)}/manifest-000000000002.json"]
    assert_same_tree(second, asyncckpt.load(url))


class CountingBackend(ObjectStoreBackend):
    """The real object-store backend, counting the bytes each data object's ranged reads return."""

    def __init__(self, url: str, options: dict) -> None:
        super().__init__(url, options)
        self.fetched: Counter[str] = Counter()
        self.requests = 0
        self._count_lock = threading.Lock()

    def open_read(self, name):
        handle = super().open_read(name)
        read_into = handle.read_into

        def counted(buffer, offset):
            n = read_into(buffer, offset)
            with self._count_lock:
                self.fetched[name] += n
                self.requests += 1
            return n

        handle.read_into = counted  # type: ignore[method-assign]
        return handle


def test_load_weights_fetches_only_the_ranges_of_the_model(s3_server, url):
    torch.manual_seed(5)
    model = torch.nn.Linear(256, 256)  # 263 KB of weights
    state = {"model": model, "moments": torch.randn(1 << 20), "step": 9}  # 4 MiB that load_weights skips
    chunk = 64 << 10
    with CheckpointManager(url, compression=None, chunk_size=chunk) as mgr:
        mgr.save(9, state).wait()
    stored = sum(size for name, size in objects(s3_server, url).items() if "/data-" in name)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    backend = CountingBackend(url, {})
    fresh = torch.nn.Linear(256, 256)
    assert asyncckpt.load_weights(backend, fresh) == 9
    assert_same_tree(dict(model.state_dict()), dict(fresh.state_dict()))
    fetched = sum(backend.fetched.values())
    assert model_bytes <= fetched <= model_bytes + 2 * chunk, (fetched, model_bytes, stored)

    everything = CountingBackend(url, {})
    assert_same_tree(state["moments"], asyncckpt.load(everything)["moments"])
    assert sum(everything.fetched.values()) == stored  # the counter sees every byte a full load reads


def test_a_restore_fetches_each_chunk_with_one_ranged_request(url):
    """Each request to an object store costs a round trip: a chunk is fetched whole (one ranged
    GET), not in the decoder's 1 MiB pieces."""
    state = {"w": torch.randn(3 << 20)}  # 12 MiB: three 4 MiB chunks
    with CheckpointManager(url, compression=None) as mgr:
        mgr.save(1, state).wait()
    backend = CountingBackend(url, {})
    assert torch.equal(asyncckpt.load(backend)["w"], state["w"])
    manifest = read_manifest(published_checkpoints(backend)[0].ref)
    assert backend.requests == len(manifest.chunks) == 3


def wait_writable(server: _s3server.S3Server) -> None:
    """Wait (bounded) until a restarted server stores an object: it lists buckets a few seconds
    before its volume server takes writes again, and a save then would fail, rightly."""
    deadline = time.monotonic() + 60
    while True:
        try:
            put_object(server, f"s3://ckpt/probe-{secrets.token_hex(4)}", "x", b"x")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ---- 3. the server stopped during a save ----------------------------------------------------------------


def test_server_stopped_during_a_save_fails_it_by_name_and_the_next_save_after_restart_works(
    tmp_path, monkeypatch, make_training
):
    from asyncckpt import _phases

    server = _s3server.start(tmp_path / "s3")
    try:
        url = fresh_s3_url()
        # short enough for the hang guard below; a refused connection fails at once anyway, and a loaded
        # machine may take seconds to answer a PUT after the restart
        options = {**server.storage_options, "timeout": 10, "connect_timeout": 2, "retries": 1}
        setup = make_training(0, 12)
        entered, go = threading.Event(), threading.Event()
        armed = threading.Event()
        real = _phases.pause

        def pause(phase: str) -> None:
            if phase == "write" and armed.is_set():
                armed.clear()
                entered.set()
                go.wait(60)
            real(phase)

        monkeypatch.setattr(_phases, "pause", pause)
        mgr = CheckpointManager(url, keep_last=None, storage_options=options)
        try:
            first = advance(setup, 1)
            mgr.save(1, setup.state).wait()

            armed.set()
            advance(setup, 2)
            handle = mgr.save(2, setup.state)  # returns at once: the upload is in the background
            assert entered.wait(60), "the save never reached its upload"
            server.stop()
            go.set()

            # the training thread goes on; the failure surfaces at the next wait, named
            outcome: list[BaseException | None] = []

            def waiting() -> None:
                try:
                    handle.wait()
                    outcome.append(None)
                except BaseException as exc:  # noqa: BLE001
                    outcome.append(exc)

            waiter = threading.Thread(target=waiting, daemon=True)
            waiter.start()
            waiter.join(60)  # a hang guard: the timeouts above bound it to seconds
            assert not waiter.is_alive(), "wait() blocked beyond the configured timeouts"
            error = outcome[0]
            assert isinstance(error, CheckpointError), error
            message = str(error)
            assert "step 2" in message or step_dir_name(2) in message, message
            assert f"{url}/{step_dir_name(2)}/" in message, message  # the object
            assert "cannot be reached" in message, message  # and the cause

            server.start()
            wait_writable(server)
            third = advance(setup, 3)
            mgr.save(3, setup.state).wait()
            assert mgr.steps() == [1, 3]
        finally:
            go.set()
            mgr.close()
        stored = objects(server, url)
        assert LEASE_NAME not in stored  # renewed again after the restart, released at close
        assert stored_steps(server, url) == [1, 3]  # the failed attempt left nothing
        assert_same_tree(third, asyncckpt.load(url, storage_options=server.storage_options))
        assert_same_tree(first, asyncckpt.load(url, step=1, storage_options=server.storage_options))
    finally:
        if server.process is not None:  # its data is not needed again: no graceful shutdown
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
            server.process = None


# ---- 4. a second writer -------------------------------------------------------------------------------


SECOND_WRITER = "import sys, asyncckpt; asyncckpt.CheckpointManager(sys.argv[1])"


def test_a_second_writer_is_refused_naming_the_holder(s3_server, url, make_training):
    import socket

    setup = make_training(0, 12)
    with CheckpointManager(url) as first:
        first.save(1, setup.state).wait()
        with pytest.raises(RootInUseError, match=rf"host {socket.gethostname()}, pid {os.getpid()}"):
            CheckpointManager(url)
        other = subprocess.run(
            [sys.executable, "-c", SECOND_WRITER, url],
            env={**os.environ, **s3_server.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode != 0
        assert "RootInUseError" in other.stderr and f"pid {os.getpid()}" in other.stderr, other.stderr
        assert first.steps() == [1]
        first.save(2, setup.state).wait()  # the holder is undisturbed
    with CheckpointManager(url) as again:  # released at close
        assert again.steps() == [1, 2]


# ---- 5. a corrupted object -----------------------------------------------------------------------------


def test_a_corrupted_object_is_named_by_verify_and_skipped_by_restore(s3_server, url, make_training, capsys):
    setup = make_training(0, 12)
    saved = {}
    with CheckpointManager(url, keep_last=None) as mgr:
        for step in (1, 2):
            saved[step] = advance(setup, step)
            mgr.save(step, setup.state).wait()
    data = sorted(n for n in objects(s3_server, url) if n.startswith(step_dir_name(2) + "/data-"))
    assert data
    raw = bytearray(get_object(s3_server, url, data[0]))
    raw[len(raw) // 2] ^= 0x10
    put_object(s3_server, url, data[0], bytes(raw))

    code, out, err = cli(capsys, "verify", url)
    assert code == 1, out + err
    assert f"{url}/{data[0]}" in out + err, out + err
    code, out, err = cli(capsys, "verify", f"{url}/{step_dir_name(1)}")
    assert code == 0, out + err

    other = make_training(1, 12)
    with CheckpointManager(url) as mgr, pytest.warns(UserWarning, match=step_dir_name(2)):
        assert mgr.restore(other.state) == 1
    assert_same_tree(saved[1], plain(other.state))
    with pytest.warns(UserWarning, match=step_dir_name(2)):
        assert_same_tree(saved[1], asyncckpt.load(url))
    with pytest.raises(CheckpointError, match=data[0].split("/")[1]):
        asyncckpt.load(url, step=2)


# ---- 6. the command line, as a subprocess with the standard environment --------------------------------


def run_cli(env: dict, *argv: str, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "asyncckpt.cli", *argv],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_the_command_line_on_an_s3_root(s3_server, url, make_training, tmp_path):
    setup = make_training(0, 12)
    saved = {}
    with CheckpointManager(url, keep_last=None) as mgr:
        for step in (1, 2, 3):
            saved[step] = advance(setup, step)
            mgr.save(step, setup.state, metrics={"loss": step / 10}).wait()
    env = s3_server.env
    out_file = tmp_path / "model.safetensors"
    # independent commands run side by side (each spawn costs an interpreter and torch)
    procs = {
        "ls": run_cli(env, "ls", url, "--json", cwd=tmp_path),
        "verify": run_cli(env, "verify", url, cwd=tmp_path),
        "inspect": run_cli(env, "inspect", f"{url}/{step_dir_name(2)}", "--json", cwd=tmp_path),
        "diff": run_cli(env, "diff", f"{url}/{step_dir_name(1)}", f"{url}/{step_dir_name(3)}", "--json", cwd=tmp_path),
        "export": run_cli(env, "export", f"{url}/{step_dir_name(3)}", "-o", str(out_file), cwd=tmp_path),
    }
    results = {name: finished(proc) for name, proc in procs.items()}
    for name, (code, out, err) in results.items():
        assert code == (1 if name == "diff" else 0), f"{name}: {out}{err}"  # diff: 1 when they differ

    rows = json.loads(results["ls"][1])
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert [row["metrics"] for row in rows] == [{"loss": 0.1}, {"loss": 0.2}, {"loss": 0.3}]
    assert results["verify"][1].count("ok") >= 3, results["verify"][1]
    assert json.loads(results["inspect"][1])["step"] == 2
    diff = json.loads(results["diff"][1])
    assert diff["counts"], diff
    assert any("model" in json.dumps(leaf) for leaf in diff["leaves"]), diff

    from safetensors.torch import load_file

    exported = load_file(str(out_file))
    assert_same_tree(dict(saved[3]["model"]), {k: exported[k] for k in saved[3]["model"]})

    code, out, err = finished(run_cli(env, "prune", url, "--keep-last", "1", cwd=tmp_path))
    assert code == 0, out + err
    assert stored_steps(s3_server, url) == [3]
    assert Catalog.of_reader(url).steps() == [3]
    code, out, err = finished(run_cli(env, "ls", url, "--json", cwd=tmp_path))
    assert code == 0, out + err
    assert [row["step"] for row in json.loads(out)] == [3]


# ---- a mirror on s3, credentials passed rather than in the environment --------------------------------


def test_load_reads_an_s3_mirror_with_mirror_options_after_the_local_root_is_gone(s3_server, tmp_path):
    # storage_options belong to the path; the mirror's options need a name of their own, as for
    # the manager, or a mirror whose credentials are not in the environment cannot be read
    url, local = fresh_s3_url(), tmp_path / "local"
    options = s3_server.storage_options
    state = {"w": torch.arange(1000, dtype=torch.float32), "step": 7}
    with CheckpointManager(local, mirror=url, mirror_options=options) as mgr:
        mgr.save(7, state)
        mgr.wait(mirror=True)
    shutil.rmtree(local)
    with pytest.warns(UserWarning, match="restoring step 7 from the mirror"):
        assert_same_tree(asyncckpt.load(local, mirror=url, mirror_options=options), plain(state))
    with pytest.raises(CheckpointError, match="storage_options apply to object-store URLs"):
        asyncckpt.load(local, mirror=tmp_path / "elsewhere", mirror_options=options)
