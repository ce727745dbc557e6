"""Starting, killing and reaping saver processes (see child.py).

``ForkServer`` forks savers from one long-lived process that has torch imported already, so a
trial does not pay an interpreter start; ``ExecSpawner`` starts a fresh interpreter per saver (set
``ASYNCCKPT_TORTURE_SPAWN=exec``), slower but with nothing shared.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

CHILD = Path(__file__).with_name("child.py")


class Saver:
    """One running saver: ``alive()``, ``kill()`` (SIGKILL), ``wait()`` -> returncode."""

    def __init__(self, spawner, pid: int, log: Path) -> None:
        self._spawner = spawner
        self.pid = pid
        self.log = log
        self.returncode: int | None = None

    def alive(self) -> bool:
        if self.returncode is None:
            self.returncode = self._spawner.poll(self)
        return self.returncode is None

    def kill(self) -> None:
        if self.returncode is None:  # unreaped, so the PID cannot have been reused
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = self._spawner.wait(self)
        return self.returncode

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""


class ForkServer:
    name = "fork-server"

    def __init__(self, workdir: Path, timeout: float = 120.0) -> None:
        self._timeout = timeout
        self._stderr = open(workdir / "fork-server.err", "w")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [sys.executable, str(CHILD), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._stderr_path = workdir / "fork-server.err"

    def _ask(self, request: dict) -> dict:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], self._timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"fork server gave no answer to {request}: {self._stderr_path.read_text()[-4000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"fork server: {reply['error']}")
        return reply

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> Saver:
        reply = self._ask({"op": "spawn", "argv": argv, "env": env, "log": str(log)})
        return Saver(self, reply["pid"], log)

    def poll(self, saver: Saver) -> int | None:
        reply = self._ask({"op": "poll", "pid": saver.pid})
        return None if reply["running"] else reply["returncode"]

    def wait(self, saver: Saver) -> int:
        return self._ask({"op": "wait", "pid": saver.pid})["returncode"]

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()


class ExecSpawner:
    name = "exec"

    def __init__(self, workdir: Path, timeout: float = 120.0) -> None:
        self._procs: dict[int, subprocess.Popen] = {}

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> Saver:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCCKPT_PHASE_")}
        full_env.update(env)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, str(CHILD), "run", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        self._procs[proc.pid] = proc
        return Saver(self, proc.pid, log)

    def poll(self, saver: Saver) -> int | None:
        return self._procs[saver.pid].poll()

    def wait(self, saver: Saver) -> int:
        return self._procs.pop(saver.pid).wait(120)

    def close(self) -> None:
        for proc in self._procs.values():
            proc.kill()
            proc.wait()
        self._procs.clear()
