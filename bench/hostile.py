"""Peak RSS and time of reading hostile checkpoint directories (each small on disk).

Each case is read in a fresh subprocess that reports its peak RSS (VmHWM) and wall time, under an
address-space limit (so a reader that would take the machine's memory fails instead). The goal:
peak RSS at most the tensor bytes the manifest declares plus 512 MiB.

- sparse-chunk: 128 bytes of tensors whose one zstd chunk claims 2 GiB of stored bytes (a sparse
  data file of 36 KB on disk); ``asyncckpt.load`` of the checkpoint.
- zstd-bomb: 2 GiB of tensors in two 1 GiB chunks, each a ~32 KB zstd frame of zeros declaring its
  size, with one byte of trailing garbage; ``load``, then ``verify`` (``asyncckpt verify``'s check).
- empty-dicts: a manifest of 64 MiB, nearly all ``{},`` in its metadata; ``asyncckpt ls``.
- deep-nesting: a manifest holding 1.5 million nested lists; ``asyncckpt ls``.
- fallback: a root whose newest checkpoint is sparse-chunk and whose older one is valid, under a
  1 GiB address-space limit; ``load(root)`` must return the older one.

    python bench/hostile.py --json bench/results/hostile-cpu.json          # the code installed
    python bench/hostile.py --src /tmp/old/src --json bench/results/hostile-cpu-before.json

``--src`` puts another checkout's ``src`` first on the child's path (an earlier version to compare
against); the directories are always built by the installed version.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import zstandard

import asyncckpt
from asyncckpt.format import MANIFEST_NAME, ChunkEntry, Manifest, TensorEntry, seal_manifest

MiB, GiB = 1 << 20, 1 << 30
DATA = "data-00000.bin"
ZSTD = [{"id": "zstd", "level": 1}]

CHILD = r"""
import json, resource, sys, time, warnings
t0 = time.perf_counter()
import asyncckpt
from pathlib import Path

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

limit = status("VmSize") + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
base = status("VmRSS")
out = {}
start = time.perf_counter()
try:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scope = {"asyncckpt": asyncckpt, "Path": Path}
        exec(sys.argv[1], scope)
    out["outcome"] = repr(scope.get("result"))[:200]
    out["warnings"] = len(caught)
except BaseException as exc:
    out["outcome"] = f"{type(exc).__name__}: {str(exc)[:200]}"
out["seconds"] = time.perf_counter() - start
out["peak_rss"] = status("VmHWM")
out["rss_after_import"] = base
print(json.dumps(out))
"""

LOAD = "asyncckpt.load({path!r})"
VERIFY = "from asyncckpt.engine.reader import verify_checkpoint\nresult = verify_checkpoint(Path({path!r})).step"
LS = (
    "import io, contextlib\nfrom asyncckpt.cli.commands import main\n"
    "with contextlib.redirect_stdout(io.StringIO()) as out:\n    main(['ls', {path!r}])\n"
    "result = out.getvalue().splitlines()[-1][-120:]"
)
LOAD_STEP = "result = asyncckpt.load({path!r})['step']"


def manifest_of(step: int, nbytes: int, chunks: list[ChunkEntry]) -> Manifest:
    return Manifest(
        step=step,
        created=time.time(),
        tree={"d": [["w", {"T": 0}], ["step", {"v": step}]]},
        tensors=[TensorEntry("float32", (nbytes // 4,), 0, nbytes)],
        chunks=chunks,
        raw_bytes=nbytes,
        stored_bytes=sum(c.length for c in chunks),
    )


def write(path: Path, manifest: Manifest | bytes, data: bytes = b"", size: int | None = None) -> Path:
    path.mkdir(parents=True)
    with open(path / DATA, "wb") as f:
        f.write(data)
        if size is not None:
            f.truncate(size)
    (path / MANIFEST_NAME).write_bytes(manifest if isinstance(manifest, bytes) else manifest.to_json())
    return path


def sparse_chunk(path: Path, step: int = 2) -> Path:
    return write(path, manifest_of(step, 128, [ChunkEntry(DATA, 0, 2 * GiB, 0, 128, ZSTD, 0)]), size=2 * GiB)


def bomb_frame(raw_length: int) -> bytes:
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=raw_length)
    piece = bytes(8 * MiB)
    parts = [compressor.compress(piece) for _ in range(raw_length // len(piece))]
    return b"".join(parts) + compressor.flush()


def zstd_bomb(path: Path) -> Path:
    frame = bomb_frame(GiB) + b"\x00"  # a trailing byte: damage, once decoded
    chunks = [ChunkEntry(DATA, i * len(frame), len(frame), i * GiB, GiB, ZSTD, zlib.crc32(frame)) for i in range(2)]
    return write(path, manifest_of(1, 2 * GiB, chunks), frame * 2)


def valid(root: Path, step: int = 1) -> Path:
    with asyncckpt.CheckpointManager(root, keep_last=None) as mgr:
        return mgr.save(step, {"w": torch.arange(1000, dtype=torch.float32), "step": step}).wait()


def with_metadata(root: Path, metadata: bytes) -> Path:
    path = valid(root)
    raw = (path / MANIFEST_NAME).read_bytes()
    body = raw[: raw.rindex(b',"crc32":')] + b"}"
    body = body.replace(b'"metadata":{}', b'"metadata":' + metadata)
    (path / MANIFEST_NAME).write_bytes(seal_manifest(body))
    return root


def build(base: Path) -> list[tuple[str, str, int, int]]:
    """(case, code, declared tensor bytes, address-space limit) for each case."""
    sparse = sparse_chunk(base / "sparse" / "step-000000000002")
    bomb = zstd_bomb(base / "bomb" / "step-000000000001")
    n = (64 * MiB - 4096) // 3
    dicts = with_metadata(base / "dicts", b'{"x":[' + b"{}," * n + b"{}]}")
    depth = 1_500_000
    deep = with_metadata(base / "deep", b"[" * depth + b"]" * depth)
    fallback = base / "fallback"
    valid(fallback, 1)
    sparse_chunk(fallback / "step-000000000002")
    return [
        ("sparse-chunk load", LOAD.format(path=str(sparse)), 128, 8 * GiB),
        ("zstd-bomb load", LOAD.format(path=str(bomb)), 2 * GiB, 8 * GiB),
        ("zstd-bomb verify", VERIFY.format(path=str(bomb)), 2 * GiB, 8 * GiB),
        ("empty-dicts ls", LS.format(path=str(dicts)), 4000, 8 * GiB),
        ("deep-nesting ls", LS.format(path=str(deep)), 4000, 8 * GiB),
        ("fallback load(root), 1 GiB limit", LOAD_STEP.format(path=str(fallback)), 4000, 1 * GiB),
    ]


def run_case(code: str, limit: int, src: str | None) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, code, str(limit)], capture_output=True, text=True, env=env, timeout=900
    )
    if done.returncode != 0:
        return {"outcome": f"exit {done.returncode}: {done.stderr.strip()[-200:]}", "peak_rss": None, "seconds": None}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", help="a checkout's src directory to read with instead of the installed one")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="asyncckpt-hostile-") as tmp:
        cases = build(Path(tmp))
        for name, code, declared, limit in cases:
            result = run_case(code, limit, args.src)
            result.update(case=name, declared_tensor_bytes=declared, goal_bytes=declared + 512 * MiB)
            rows.append(result)
            peak = "-" if result["peak_rss"] is None else f"{result['peak_rss'] / MiB:8.0f}"
            secs = "-" if result["seconds"] is None else f"{result['seconds']:6.2f}"
            print(f"{name:34} declared {declared / MiB:7.1f} MiB  peak RSS {peak} MiB  {secs} s  {result['outcome']}")
    if args.json:
        info = {"src": args.src or "installed", "rows": rows}
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
