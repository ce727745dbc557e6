"""Run a function on N ranks, each its own process, joined in a gloo process group (multi-rank tests on CPU).

``run_ranks(fn, world_size, *args)`` is the whole story for most tests::

    def _check(rank, world_size, n):  # module level in a tests module: the children import it by name
        return rank * n

    assert run_ranks(_check, 2, 10) == [0, 10]

Each rank is a fresh process forked by multiprocessing's fork server, which imported torch once and
nothing else (never a fork of the test process: torch and gloo own threads there; and asyncckpt,
which reads some variables at import, is imported in the rank, after ``env`` is set). It sets
MASTER_ADDR / MASTER_PORT (a free port the parent picked) / RANK / WORLD_SIZE / LOCAL_RANK, runs
``torch.set_num_threads(1)``, joins ``init_process_group("gloo")``, calls ``fn(rank, world_size, *args)``,
destroys the group and sends back fn's return value (plain ``pickle``: tensors are fine, DTensors are
not) or its formatted traceback. The parent returns the values in rank order, or raises AssertionError
naming every rank that raised (with its traceback), died (with its exit code) or hung past ``timeout``
(with every thread's Python stack, dumped by faulthandler just before the kill). No child outlives the
call: the parent kills the stragglers in ``finally`` and each child also exits by itself when the
test process goes away (it waits on a pipe whose other end only that process holds).

For crash tests, ``start_ranks`` returns the running ``RankJob``: ``job.procs``, ``job.kill(rank)``
(SIGKILL), ``job.wait_until(reached)``, then ``job.join()`` (values, or raise as ``run_ranks`` does) or
``job.outcomes()`` (one ``RankOutcome`` per rank, never raises), and ``job.close()`` (or ``with job:``).

``fn``, ``args`` and the return value cross process boundaries, so they must be picklable; ``fn`` must
be a module-level function of an importable module (tests/ is on the children's sys.path: tests
import ``_dist`` as a top-level module, the same way they import ``_s3server``).
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankOutcome:
    """How one rank ended. ``status``: "ok" (``value`` is fn's result), "raised" (``error`` is the
    traceback), "died" (exited or was killed without reporting: ``exitcode``), "hung" (still running at
    the deadline and killed then: ``error`` is its faulthandler stack dump, when there was one)."""

    rank: int
    status: str
    value: Any = None
    error: str | None = None
    exitcode: int | None = None

    def describe(self) -> str:
        if self.status == "raised":
            return f"rank {self.rank} raised:\n{self.error}"
        if self.status == "died":
            return f"rank {self.rank} died without a result (exit code {self.exitcode})"
        if self.status == "hung":
            return f"rank {self.rank} hung (killed at the deadline); its stacks:\n{self.error or '(none)'}"
        return f"rank {self.rank} ok"


class RankJob:
    """``world_size`` running ranks (see ``start_ranks``). Not thread-safe; one ``join``/``outcomes``."""

    def __init__(self, fn: Callable[..., Any], world_size: int, args: tuple, timeout: float, env: dict | None):
        module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
        if module in (None, "__main__") or "." in name or "<" in name:
            raise ValueError(f"fn must be a module-level function of an importable module, not {module}.{name}")
        self.world_size = world_size
        self.timeout = timeout
        self.started = time.monotonic()
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._lifelines: list[multiprocessing.connection.Connection] = []
        environ = dict(os.environ)  # the test's, now: the fork server's is from when it started
        self._dumps = tempfile.mkdtemp(prefix="dist-stacks-")
        try:
            ctx = rank_context()
            port = free_port()
            for rank in range(world_size):
                recv, send = ctx.Pipe(duplex=False)
                # the parent holds the write end, the child waits on the read end: EOF there means the
                # parent is gone (the child's parent is the fork server, which may outlive it)
                lifeline, held = ctx.Pipe(duplex=False)
                spec = _ChildSpec(
                    module, name, rank, world_size, port, timeout, environ, dict(env or {}), self._stack_file(rank)
                )
                # not daemonic, so fn may start processes of its own (DataLoader workers); close() and
                # the child's exit-with-parent thread see that none outlives the job
                proc = ctx.Process(target=_child_main, args=(spec, args, send, lifeline), name=f"rank{rank}")
                self._lifelines.append(held)
                self._conns.append(recv)
                try:
                    proc.start()
                finally:
                    send.close()  # the child holds the write end: EOF on recv means the child is gone
                    lifeline.close()
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise

    def _stack_file(self, rank: int) -> str:
        return os.path.join(self._dumps, f"rank{rank}.stacks")

    def kill(self, rank: int) -> None:
        """SIGKILL one rank now (its outcome becomes "died", exit code -9)."""
        proc = self.procs[rank]
        if proc.exitcode is None:  # reads the exit status the fork server reports once it reaped it
            proc.kill()

    def wait_until(self, reached: Callable[[], bool], what: str = "the point", timeout: float | None = None) -> None:
        """Poll ``reached()`` every 10 ms; AssertionError if every rank exits first or ``timeout``
        (default: the job's) passes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not reached():
            if all(p.exitcode is not None for p in self.procs):
                raise AssertionError(f"every rank exited before {what}: {[p.exitcode for p in self.procs]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the ranks never reached {what}")
            time.sleep(0.01)

    def outcomes(self, timeout: float | None = None, grace: float = 10.0) -> list[RankOutcome]:
        """Wait for every rank for ``timeout`` more seconds (default: until the job's own timeout, counted
        from its start), then kill the rest. Once some rank has raised or died, the others get at most
        ``grace`` more seconds (they are usually stuck in a collective with it). Never raises for a
        rank's failure."""
        deadline = self.started + self.timeout if timeout is None else time.monotonic() + timeout
        done: dict[int, RankOutcome] = {}
        pending = {conn: rank for rank, conn in enumerate(self._conns)}
        try:
            while pending:
                # past the deadline, still take what already came (a job joined after another one hung)
                ready = multiprocessing.connection.wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                for conn in ready:
                    rank = pending.pop(conn)
                    try:
                        kind, payload = pickle.loads(conn.recv_bytes())
                    except (EOFError, OSError):
                        self.procs[rank].join(5)
                        done[rank] = RankOutcome(rank, "died", exitcode=self.procs[rank].exitcode)
                    else:
                        if kind == "ok":
                            done[rank] = RankOutcome(rank, "ok", value=payload)
                        else:
                            done[rank] = RankOutcome(rank, "raised", error=payload)
                    if done[rank].status != "ok":
                        deadline = min(deadline, time.monotonic() + grace)
            for rank in pending.values():
                done[rank] = RankOutcome(rank, "hung", error=self._dump_stacks(rank))
        finally:
            self.close()
        for rank, outcome in done.items():
            if outcome.exitcode is None and outcome.status in ("died", "hung"):
                outcome.exitcode = self.procs[rank].exitcode
        return [done[rank] for rank in range(self.world_size)]

    def join(self, timeout: float | None = None) -> list[Any]:
        """fn's return values in rank order; AssertionError describing each rank that did not return
        (``timeout``: as for ``outcomes``)."""
        outcomes = self.outcomes(timeout)
        bad = [o for o in outcomes if o.status != "ok"]
        if bad:
            raise AssertionError(
                f"{len(bad)} of {self.world_size} ranks failed:\n\n" + "\n\n".join(o.describe() for o in bad)
            )
        return [o.value for o in outcomes]

    def _dump_stacks(self, rank: int) -> str | None:
        proc, path = self.procs[rank], self._stack_file(rank)
        if proc.pid is None or proc.exitcode is not None or not os.path.exists(path):
            return None  # not yet running fn (its faulthandler is armed right before)
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(1.0)  # faulthandler writes from the signal handler, at once
            with open(path) as f:
                return f.read() or None
        return None

    def close(self) -> None:
        """Kill every child still running and reap it (idempotent)."""
        for proc in self.procs:
            if proc.exitcode is None:
                with contextlib.suppress(OSError):
                    proc.kill()
        for proc in self.procs:
            proc.join(10)
        for conn in self._conns + self._lifelines:
            conn.close()
        for name in os.listdir(self._dumps) if os.path.isdir(self._dumps) else []:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._dumps, name))
        with contextlib.suppress(OSError):
            os.rmdir(self._dumps)

    def __enter__(self) -> RankJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rank_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context that starts the ranks (a fork server with torch imported): a rank
    then starts in a fraction of a second, not the 2-3 s a fresh interpreter takes to import torch
    here, and the suite starts ranks dozens of times."""
    ctx = multiprocessing.get_context("forkserver")
    if not _server_started:
        _start_server(ctx)
    return ctx


_server_started = False


def _start_server(ctx: multiprocessing.context.BaseContext) -> None:
    """The server imports torch (and numpy, whose BLAS starts its threads at import) once, with one
    thread each, as every rank runs; a rank gets the test's environment from its spec."""
    global _server_started
    ctx.set_forkserver_preload(["torch"])
    caps = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    saved = {name: os.environ.get(name) for name in caps}
    os.environ.update(caps)
    try:
        multiprocessing.forkserver.ensure_running()
        _server_started = True
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, env: dict | None = None
) -> RankJob:
    """Start ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks and return at once.
    ``env`` adds variables to the children's environment (torch is imported there already; asyncckpt is not)."""
    return RankJob(fn, world_size, args, timeout, env)


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, env: dict | None = None
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; the return values in rank
    order, or AssertionError with each failing rank's traceback / exit code / stacks if it hung."""
    with start_ranks(fn, world_size, *args, timeout=timeout, env=env) as job:
        return job.join()


# -- the child side ------------------------------------------------------------------------------


@dataclass
class _ChildSpec:
    module: str
    name: str
    rank: int
    world_size: int
    port: int
    timeout: float
    environ: dict
    env: dict
    stack_file: str


def _exit_with_parent(lifeline: multiprocessing.connection.Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv_bytes()  # nothing is ever sent: this returns when the parent closes its end or dies
    os._exit(70)


def _become_child(lifeline: multiprocessing.connection.Connection, environ: dict) -> None:
    """What every child of the fork server does first: exit with the test process, and take its
    environment (the server's is from when it started)."""
    threading.Thread(target=_exit_with_parent, args=(lifeline,), daemon=True, name="exit-with-parent").start()
    os.environ.clear()
    os.environ.update(environ)


def _child_main(
    spec: _ChildSpec,
    args: tuple,
    conn: multiprocessing.connection.Connection,
    lifeline: multiprocessing.connection.Connection,
) -> None:
    _become_child(lifeline, spec.environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(spec.port),
        RANK=str(spec.rank),
        WORLD_SIZE=str(spec.world_size),
        LOCAL_RANK=str(spec.rank),
        LOCAL_WORLD_SIZE=str(spec.world_size),
        OMP_NUM_THREADS="1",
    )
    os.environ.update(spec.env)
    if _TESTS_DIR not in sys.path:
        sys.path.insert(0, _TESTS_DIR)
    try:
        import datetime
        import faulthandler

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
            torch.set_num_interop_threads(1)
        fn = getattr(importlib.import_module(spec.module), spec.name)
        stacks = open(spec.stack_file, "w")  # lives as long as the process
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
        dist.init_process_group(
            "gloo",
            rank=spec.rank,
            world_size=spec.world_size,
            timeout=datetime.timedelta(seconds=spec.timeout),
        )
        try:
            result = ("ok", fn(spec.rank, spec.world_size, *args))
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    except BaseException:
        result = ("raised", traceback.format_exc())
    try:
        payload = pickle.dumps(result)
    except Exception:
        payload = pickle.dumps(("raised", "fn's return value does not pickle:\n" + traceback.format_exc()))
    conn.send_bytes(payload)
    conn.close()


def slowed(cls: type, names: list[str], seconds: float) -> None:
    """In a rank process: make ``cls``'s methods ``names`` sleep ``seconds`` before they run."""
    for name in names:
        real = getattr(cls, name)

        def slow(self, *args, _real=real, **kwargs):
            time.sleep(seconds)
            return _real(self, *args, **kwargs)

        setattr(cls, name, slow)


def die_at_phase(phase: str, *, after: str | None = None, mark: str | None = None) -> None:
    """In a rank process: SIGKILL this process when it reaches ``_phases.pause(phase)`` (only once
    it has passed ``after``, when given), touching the file ``mark`` first so the test knows it
    died there."""
    from asyncckpt import _phases

    real, seen = _phases.pause, set()

    def pause(name: str) -> None:
        seen.add(name)
        if name == phase and (after is None or after in seen):
            if mark is not None:
                open(mark, "a").close()
            os.kill(os.getpid(), signal.SIGKILL)
        real(name)

    _phases.pause = pause


def _code_main(code: str, argv: list[str], environ: dict, output: str, lifeline) -> None:
    """A ``python -c`` child (``_kill.start_code``): the environment, stdout and stderr to
    ``output``, ``sys.argv``, then the code as ``__main__``. Here, not in ``_kill``, so that the
    child does not import pytest."""
    _become_child(lifeline, environ)
    out = os.open(output, os.O_WRONLY | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    sys.argv = ["-c", *argv]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
