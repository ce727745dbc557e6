"""The process the torture test kills: it saves checkpoints of a known state, forever.

``python child.py run ROOT LEDGER COMPRESSION REPEAT SEED`` opens a CheckpointManager on ROOT
(keep_last=2, so retention runs), and saves ``content(step)`` over and over: usually the next
step, with probability REPEAT the same step again (so the commit has to replace a committed
checkpoint). After each ``handle.wait()`` it appends ``"step sha256"`` to LEDGER and fsyncs it:
a line in the ledger is a save the caller was told had committed. The phase seam is configured
through the environment (``ASYNCCKPT_PHASE_DELAY``, ``ASYNCCKPT_PHASE_MARK``); ``ready`` is
appended to the mark file once the manager is open.

``python child.py serve`` is a fork server: it imports torch and asyncckpt once (about 2 s) and
then forks one saver per request, so a kill costs tens of milliseconds instead of a fresh
interpreter. It reads one JSON request per line on stdin and answers one JSON line on stdout:

  {"op": "spawn", "argv": [...run arguments...], "env": {...}, "log": PATH} -> {"pid": PID}
  {"op": "poll", "pid": PID}  -> {"running": true} or {"running": false, "returncode": RC}
  {"op": "wait", "pid": PID}  -> {"returncode": RC}   (RC is -SIGNAL for a killed child)

The server reaps its children only when asked, so a PID stays valid until ``poll``/``wait``
reports it gone and a SIGKILL can never reach a recycled PID. In the forked saver the environment
is applied and ``asyncckpt._phases`` is reloaded, since it reads the environment at import.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import sys
import traceback

import torch

import asyncckpt

NUMEL = 786_432  # float32: 3 MiB, three 1 MiB chunks
CHUNK_SIZE = 1 << 20
KEEP_LAST = 2


def content(step: int) -> dict:
    """The state saved at ``step``: a deterministic function of the step alone."""
    gen = torch.Generator().manual_seed(step)
    return {
        "x": torch.randn(NUMEL, generator=gen),
        "aux": {
            "w": torch.randn(64, 64, generator=gen).to(torch.bfloat16),
            "ids": torch.arange(16, dtype=torch.int64) + step,
        },
        "step": step,
        "name": f"step-{step}",
    }


def digest(tree: dict) -> str:
    """sha256 over every tensor's bytes and the plain leaves of a ``content``-shaped tree."""
    h = hashlib.sha256()
    for tensor in (tree["x"], tree["aux"]["w"], tree["aux"]["ids"]):
        h.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(f"{tree['step']!r} {tree['name']!r}".encode())
    return h.hexdigest()


def run(root: str, ledger: str, compression: str, repeat: float, seed: int) -> None:
    rng = random.Random(seed)
    mgr = asyncckpt.CheckpointManager(
        root,
        keep_last=KEEP_LAST,
        compression=None if compression == "none" else compression,
        chunk_size=CHUNK_SIZE,
    )
    steps = mgr.steps()
    step = steps[-1] if steps else 0
    have = bool(steps)  # is `step` committed, so that saving it again replaces it?
    mark = os.environ.get("ASYNCCKPT_PHASE_MARK")
    if mark:
        with open(mark, "a") as f:
            f.write("ready\n")
    with open(ledger, "a") as log:
        while True:
            if not (have and rng.random() < repeat):
                step += 1
            state = content(step)
            mgr.save(step, state, metrics={"step": step}).wait()
            have = True
            log.write(f"{step} {digest(state)}\n")
            log.flush()
            os.fsync(log.fileno())


def _run_argv(argv: list[str]) -> None:
    root, ledger, compression, repeat, seed = argv
    run(root, ledger, compression, float(repeat), int(seed))


def _forked(request: dict) -> None:
    """In the forked child: detach from the server's pipes, apply the environment, run."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for key in ("ASYNCCKPT_PHASE_DELAY", "ASYNCCKPT_PHASE_MARK"):
        os.environ.pop(key, None)
    os.environ.update(request["env"])
    importlib.reload(asyncckpt._phases)  # it parsed the (server's) environment at import
    _run_argv(request["argv"])


def _returncode(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def serve() -> None:
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "spawn":
            out.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    _forked(request)
                    code = 0
                except BaseException:  # noqa: BLE001 - whatever it is goes to the child's log
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            reply = {"pid": pid}
        elif op == "poll":
            pid, status = os.waitpid(request["pid"], os.WNOHANG)
            reply = {"running": True} if pid == 0 else {"running": False, "returncode": _returncode(status)}
        elif op == "wait":
            _, status = os.waitpid(request["pid"], 0)
            reply = {"returncode": _returncode(status)}
        else:
            reply = {"error": f"unknown op {op!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["run"]:
        _run_argv(sys.argv[2:])
    else:
        sys.exit(f"usage: {sys.argv[0]} serve | run ROOT LEDGER COMPRESSION REPEAT SEED")
