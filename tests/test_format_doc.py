"""docs/format.md describes the format the code writes: a reader written from that page alone (no
asyncckpt import) reads a real checkpoint to the same state ``asyncckpt.load`` gives, and the
page's figures are the code's."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

import asyncckpt
from _trees import assert_same_tree
from asyncckpt import format as fmt

FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "format.md"


# ---- a reader written from docs/format.md ----------------------------------------------------


def _checked_manifest(directory: Path) -> dict:
    """Sections 6.2, 7 and 3.1: the seal on the bytes as read, then the JSON."""
    raw = (directory / "manifest.json").read_bytes()
    assert len(raw) <= 64 << 20
    assert raw.count(b",") + raw.count(b"[") + raw.count(b"{") <= 2_000_000
    seal = re.search(rb',"crc32":([0-9]{1,10})\}$', raw)
    assert seal is not None and zlib.crc32(raw[: seal.start()] + b"}") == int(seal.group(1))
    body = json.loads(raw)
    assert body["format"] == "asyncckpt" and body["version"] == 1
    assert list(body)[-1] == "crc32"
    return body


def _logical_bytes(directory: Path, body: dict) -> bytearray:
    """Sections 3.4, 5 and 6.1: every chunk checked, decoded in reverse chain order, put in place."""
    space = bytearray(body["raw_bytes"])
    expected_start = 0
    for chunk in body["chunks"]:
        assert chunk["raw_offset"] == expected_start
        expected_start += chunk["raw_length"]
        data = (directory / chunk["file"]).read_bytes()[chunk["offset"] : chunk["offset"] + chunk["length"]]
        assert len(data) == chunk["length"] and zlib.crc32(data) == chunk["crc32"]
        for codec in reversed(chunk["codecs"]):
            if codec["id"] == "zstd":
                assert zstandard.frame_content_size(data) == chunk["raw_length"]
                data = zstandard.ZstdDecompressor().decompress(data)
            elif codec["id"] == "bytegroup":
                planes = np.frombuffer(data, dtype=np.uint8).reshape(codec["size"], -1)
                data = planes.T.tobytes()  # byte p of element k was at plane p, position k
            elif codec["id"] == "planes":
                data = _undo_planes(data, codec, chunk["raw_length"])
            elif codec["id"] == "zplanes":
                data = _undo_zero_planes(data, codec, chunk["raw_length"])
            else:
                raise AssertionError(f"codec {codec['id']} is not in docs/format.md")
        assert len(data) == chunk["raw_length"]
        space[chunk["raw_offset"] : chunk["raw_offset"] + chunk["raw_length"]] = data
    assert expected_start == body["raw_bytes"] and sum(c["length"] for c in body["chunks"]) == body["stored_bytes"]
    return space


def _undo_planes(data: bytes, codec: dict, raw_length: int) -> bytes:
    """Section 5's ``planes``: parts back to planes, planes interleaved, elements rotated right."""
    size, rotate = codec["size"], codec["rotate"]
    plane_length = raw_length // size
    assert len(codec["parts"]) == size and sum(codec["parts"]) == len(data)
    pieces = [plane_length] * size
    if "low_bit" in codec:  # plane 0 packed: 7 bits a byte, ceil(7n / 8) bytes
        pieces[0] = -(-7 * plane_length // 8)
    planes, at = [], 0
    for n, piece in zip(codec["parts"], pieces, strict=True):
        part = data[at : at + n]
        at += n
        if n < piece:
            assert zstandard.frame_content_size(part) == piece
            part = zstandard.ZstdDecompressor().decompress(part)
        assert len(part) == piece
        planes.append(part)
    if "low_bit" in codec:
        stream = int.from_bytes(planes[0], "little")  # stream bit j is bit j % 8 of byte j / 8
        assert stream >> (7 * plane_length) == 0  # the unused high bits of the last byte
        planes[0] = bytes(((stream >> (7 * k)) & 0x7F) << 1 | codec["low_bit"] for k in range(plane_length))
    interleaved = np.stack([np.frombuffer(p, dtype=np.uint8) for p in planes], axis=1).tobytes()
    bits, out = 8 * size, bytearray()
    for k in range(0, raw_length, size):  # the slow way, as the page says it
        value = int.from_bytes(interleaved[k : k + size], "little")
        value = (value >> rotate) | ((value << (bits - rotate)) & ((1 << bits) - 1))
        out += value.to_bytes(size, "little")
    return bytes(out)


def _undo_zero_planes(data: bytes, codec: dict, raw_length: int) -> bytes:
    """Section 5's ``zplanes``: the mask (part 0), the kept elements as ``planes`` of them, zeros
    where the mask's bit is clear."""
    size, kept_count = codec["size"], codec["nonzero"]
    n = raw_length // size
    mask_length = -(-n // 8)
    assert len(codec["parts"]) == size + 1 and sum(codec["parts"]) == len(data)
    mask = data[: codec["parts"][0]]
    if len(mask) < mask_length:
        assert zstandard.frame_content_size(mask) == mask_length
        mask = zstandard.ZstdDecompressor().decompress(mask)
    planes = dict(codec, parts=codec["parts"][1:])
    kept = _undo_planes(data[codec["parts"][0] :], planes, kept_count * size)
    bits = [(mask[k // 8] >> (k % 8)) & 1 for k in range(n)]
    assert sum(bits) == kept_count and all(b == 0 for b in (mask[-1] >> (n % 8),) if n % 8)
    out, j = bytearray(), 0
    for bit in bits:
        if bit:
            out += kept[j * size : (j + 1) * size]
            j += 1
        else:
            out += bytes(size)
    return bytes(out)


def _tensors(body: dict, space: bytearray) -> list[torch.Tensor]:
    """Section 3.3: each tensor is ``nbytes`` at ``offset``, row-major, in a dtype named as torch names it."""
    out = []
    for entry in body["tensors"]:
        assert entry["offset"] % 64 == 0
        data = bytearray(space[entry["offset"] : entry["offset"] + entry["nbytes"]])
        raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        out.append(raw.view(getattr(torch, entry["dtype"])).reshape(entry["shape"]))
    return out


def _rebuild(node: dict, tensors: list[torch.Tensor]):
    """Section 3.5's table, one row per branch (``o`` nodes become their state dict, as ``load`` gives)."""
    (kind,) = [k for k in node if k not in ("m", "cls")]
    value = node[kind]
    if kind == "d":
        return {key: _rebuild(child, tensors) for key, child in value}
    if kind == "l":
        return [_rebuild(child, tensors) for child in value]
    if kind == "t":
        return tuple(_rebuild(child, tensors) for child in value)
    if kind == "T":
        return tensors[value]
    if kind == "N":
        return tensors[value].numpy()
    if kind == "S":
        return tensors[value].numpy()[()]
    if kind == "v":
        return value
    if kind == "dt":
        return getattr(torch, value)
    if kind == "dev":
        return torch.device(value)
    if kind == "o":
        return _rebuild(value, tensors)
    raise AssertionError(f"node kind {kind!r} is not in docs/format.md")


def read_by_the_spec(root: Path) -> object:
    """The newest checkpoint of ``root`` (section 1: the highest step), read as the page says."""
    steps = sorted(p for p in root.iterdir() if re.fullmatch(r"step-[0-9]{12}", p.name) and p.is_dir())
    directory = steps[-1]
    body = _checked_manifest(directory)
    assert int(directory.name.removeprefix("step-")) == body["step"]
    return _rebuild(body["tree"], _tensors(body, _logical_bytes(directory, body)))


def varied_state() -> dict:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.LayerNorm(300))
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "halves": torch.randn(5000, generator=gen).to(torch.bfloat16),
        "wide": torch.randn(700, 3, generator=gen, dtype=torch.float64),
        "complex": torch.randn(40, generator=gen, dtype=torch.complex64),
        "complex128": torch.randn(600, generator=gen, dtype=torch.complex128) * 0.01,
        "ids": torch.randint(0, 1000, (3000,), generator=gen),
        "mask": torch.rand(333, generator=gen) > 0.5,
        "zeros": torch.zeros(20000),  # zstd shrinks it to almost nothing
        "noise": torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=gen),  # zstd cannot: stored raw
        "empty": torch.empty(0, 3),
        "tied": [None, 1.5, float("nan"), "text", (True, 2)],
        "array": np.arange(12, dtype=np.int16).reshape(3, 4),
        "scalar": np.int32(7),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        7: {"int key": True},
    }


@pytest.mark.parametrize("compression", ["zstd", None])
def test_a_reader_written_from_the_page_reads_what_load_reads(tmp_path, compression):
    state = varied_state()
    state["tied"][0] = state["halves"]  # the same tensor under two names: one tensors[] entry
    state["sparse"] = torch.zeros(4096)
    state["sparse"][::3] = torch.linspace(-1, 1, 1366)  # two thirds exact zeros: zplanes
    state["variance"] = torch.rand(3000, generator=torch.Generator().manual_seed(1)) + 0.1  # one sign: low_bit
    state["negative"] = -state["variance"]
    state["sparse variance"] = state["sparse"].abs()
    with asyncckpt.CheckpointManager(tmp_path, compression=compression, chunk_size=4096) as mgr:
        mgr.save(3, state).wait()
    body = _checked_manifest(tmp_path / "step-000000000003")
    chains = {tuple(c["id"] for c in chunk["codecs"]) for chunk in body["chunks"]}
    if compression is None:
        assert chains == {()}
    else:
        # every chain the page defines, in use
        assert chains == {(), ("zstd",), ("bytegroup", "zstd"), ("planes",), ("zplanes",)}
        codecs = [c for chunk in body["chunks"] for c in chunk["codecs"]]
        signs = {(c["id"], c.get("low_bit")) for c in codecs if c["id"] in ("planes", "zplanes")}
        assert signs >= {("planes", None), ("planes", 0), ("planes", 1), ("zplanes", 0), ("zplanes", 1)}
    entries = dict(body["tree"]["d"])
    assert entries["tied"]["l"][0] == entries["halves"]  # section 3.5: two leaves, one tensors[] entry
    assert_same_tree(asyncckpt.load(tmp_path), read_by_the_spec(tmp_path))


def test_the_tree_example_is_what_a_save_writes(tmp_path):
    text = FORMAT_MD.read_text()
    example = re.search(r"is saved as\n\n```json\n(.+?)\n```", text, re.DOTALL)
    assert example is not None
    with asyncckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(3, {"model": torch.nn.Linear(3, 2), "step": 3}).wait()
    written = json.loads((tmp_path / "step-000000000003" / "manifest.json").read_bytes())["tree"]
    assert written == json.loads(example.group(1))


def test_the_pages_figures_are_the_codes():
    text = " ".join(FORMAT_MD.read_text().split())  # one line: figures may wrap
    assert f"`version` is {fmt.FORMAT_VERSION}." in text
    assert f"rank tables of `version` {fmt.MULTI_RANK_VERSION}" in text
    assert f"the number of ranks that wrote the checkpoint, in [1, {fmt.MAX_WORLD_SIZE}] |" in text
    assert f"more than 64 MiB ({fmt.MAX_MANIFEST_BYTES:,} bytes)" in text and fmt.MAX_MANIFEST_BYTES == 64 << 20
    assert f"more than {fmt.MAX_MANIFEST_VALUES:,} JSON values" in text
    assert f"[1, 2^{fmt.MAX_CHUNK_RAW.bit_length() - 1}]" in text
    assert "[0, 10^12 - 1]" in text and fmt.MAX_STEP == 10**12 - 1
    assert f"a state nested {fmt.MAX_TREE_DEPTH} levels deep" in text
    dtype_bullet = re.search(r"Dtype names and their sizes in bytes: (.+?)\. The names", text)
    assert dtype_bullet is not None
    named = re.findall(r"`([a-z0-9_]+)`", dtype_bullet.group(1))
    assert set(named) == set(fmt.DTYPES)  # every dtype this torch has, and no other
    for name in named:
        assert f"`{name}` {fmt.DTYPES[name].itemsize}" in dtype_bullet.group(1) or fmt.DTYPES[name].itemsize == 1
