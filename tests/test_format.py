"""format.py: the manifest is untrusted input. Everything wrong is a CheckpointError saying what."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncckpt import CheckpointError
from asyncckpt import format as fmt
from asyncckpt.format import ChunkEntry, Manifest, TensorEntry, parse_manifest
from asyncckpt.state.tree import MAX_DEPTH, flatten, unflatten

VALID = Manifest(
    step=1200,
    created=1764230400.25,
    tree={
        "d": [
            ["model", {"o": {"d": [["w", {"T": 0}]], "m": {"": {"version": 1}}}, "cls": "Linear"}],
            [
                3,
                {
                    "l": [
                        {"T": 1},
                        {"N": 1},
                        {"S": 0},
                        {"v": 3.5},
                        {"v": None},
                        {"dt": "bfloat16"},
                        {"dev": "cuda:0"},
                        {"t": [{"v": "x"}, {"d": []}]},
                    ]
                },
            ],
        ]
    },
    tensors=[
        TensorEntry("float32", (4,), 0, 16),
        TensorEntry("float16", (2, 4), 64, 16),
    ],
    chunks=[
        ChunkEntry("data-00000.bin", 0, 30, 0, 64, [{"id": "bytegroup", "size": 4}, {"id": "zstd", "level": 1}], 1),
        ChunkEntry("data-00000.bin", 30, 64, 64, 64, [], 0xFFFFFFFF),
    ],
    raw_bytes=128,
    stored_bytes=94,
    metrics={"loss": 0.5},
    metadata={"run": "a", "tags": ["x"]},
)


def body() -> dict:
    return json.loads(VALID.to_json())


def encode(value) -> bytes:
    return json.dumps(value).encode()


def test_valid_manifest_parses_back_equal():
    parsed = parse_manifest(VALID.to_json())
    assert isinstance(parsed, Manifest)
    assert parsed == VALID
    assert parsed.tensors[1].shape == (2, 4)
    assert parsed.chunks[0].codecs == [{"id": "bytegroup", "size": 4}, {"id": "zstd", "level": 1}]


def test_entries_are_written_with_every_field_as_dataclasses_would():
    """The hand-built entry dicts hold every field, in field order: a field added to an entry
    without its ``to_dict`` fails here, not as a manifest that drops it."""
    for entry in [*VALID.tensors, *VALID.chunks]:
        assert list(entry.to_dict().items()) == list(dataclasses.asdict(entry).items())
    written = body()
    assert written["tensors"][1] == {"dtype": "float16", "shape": [2, 4], "offset": 64, "nbytes": 16}
    assert written["chunks"][0]["codecs"] == [{"id": "bytegroup", "size": 4}, {"id": "zstd", "level": 1}]


def test_empty_checkpoint_and_missing_optional_fields_parse():
    b = body()
    b.update(tree={"d": []}, tensors=[], chunks=[], raw_bytes=0, stored_bytes=0)
    del b["metrics"], b["metadata"]
    parsed = parse_manifest(encode(b))
    assert parsed.tensors == [] and parsed.chunks == [] and parsed.metrics == {} and parsed.metadata == {}


def test_manifest_with_a_tree_as_deep_as_flatten_allows_round_trips():
    """flatten accepts states nested up to tree.MAX_DEPTH; the manifest must be able to hold them
    (Manifest.to_json goes through dataclasses.asdict, which recurses into the skeleton)."""
    state = 0
    for _ in range(MAX_DEPTH):
        state = {"a": state}
    skeleton = flatten(state).skeleton
    manifest = Manifest(step=1, created=0.0, tree=skeleton, tensors=[], chunks=[], raw_bytes=0, stored_bytes=0)
    parsed = parse_manifest(manifest.to_json())
    assert unflatten(parsed.tree, []) == state


# ---- JSON level ---------------------------------------------------------------------------------


def test_duplicate_json_keys_are_rejected():
    raw = VALID.to_json().replace(b'"step":1200,', b'"step":1200,"step":5,')
    with pytest.raises(CheckpointError, match="duplicate key 'step'"):
        parse_manifest(raw)


def test_duplicate_keys_deep_inside_are_rejected():
    raw = VALID.to_json().replace(b'"nbytes":16}', b'"nbytes":16,"nbytes":16}', 1)
    with pytest.raises(CheckpointError, match="duplicate key 'nbytes'"):
        parse_manifest(raw)


def test_non_utf8_bytes_are_rejected():
    raw = VALID.to_json().replace(b'"run":"a"', b'"run":"\xff\xfe"')
    with pytest.raises(CheckpointError, match="not valid JSON.*utf-8"):
        parse_manifest(raw)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'"asyncckpt"', b"{}garbage"])
def test_not_a_json_object(raw):
    with pytest.raises(CheckpointError, match="not valid JSON|expected an object|format is"):
        parse_manifest(raw)


def test_oversized_manifest_is_rejected_before_parsing(monkeypatch):
    raw = VALID.to_json()
    monkeypatch.setattr(fmt, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(CheckpointError, match="exceeds the reader.s limit of 100 bytes"):
        parse_manifest(raw)
    with pytest.raises(ValueError, match="over the reader.s limit of 100 bytes"):  # nor is one written
        VALID.to_json()


def test_deeply_nested_json_is_an_error_not_a_crash():
    depth = 100_000
    raw = (
        b'{"format":"asyncckpt","version":1,"step":1,"created":0,"raw_bytes":0,"stored_bytes":0,'
        b'"tensors":[],"chunks":[],"tree":' + b'{"l":[' * depth + b"]}" * depth + b"}"
    )
    with pytest.raises(CheckpointError, match="recursion|nested|deep"):
        parse_manifest(raw)


def test_deeply_nested_metadata_is_an_error_not_a_crash():
    depth = 100_000
    raw = VALID.to_json().replace(b'"metadata":{', b'"metadata":{"x":' + b"[" * depth + b"]" * depth + b",", 1)
    with pytest.raises(CheckpointError, match="recursion|nested|deep"):
        parse_manifest(raw)


def test_tree_deeper_than_the_limit_is_rejected():
    depth = 2 * fmt.MAX_TREE_DEPTH + 50  # JSON can parse it; the tree check must refuse it
    tree = '{"o":' * depth + '{"v":1}' + "}" * depth
    b = body()
    b.update(tensors=[], chunks=[], raw_bytes=0, stored_bytes=0, tree="@TREE@")
    raw = json.dumps(b).replace('"@TREE@"', tree).encode()
    with pytest.raises(CheckpointError, match="tree.*nested too deeply"):
        parse_manifest(raw)


# ---- field by field -----------------------------------------------------------------------------


def _set(path, value):
    def mutate(b):
        target = b
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path):
    def mutate(b):
        target = b
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


CASES = {
    "wrong format": (_set(["format"], "torch"), "format is 'torch', expected 'asyncckpt'"),
    "missing format": (_delete(["format"]), "format is None"),
    "wrong version": (_set(["version"], 2), "format version 2 is not supported"),
    "version as string": (_set(["version"], "1"), "format version '1' is not supported"),
    "negative step": (_set(["step"], -1), r"\(step\).*got -1"),
    "step too large": (_set(["step"], 10**12), r"\(step\).*got 1000000000000"),
    "bool step": (_set(["step"], True), r"\(step\).*got True"),
    "created not a number": (_set(["created"], "today"), r"\(created\).*expected a number"),
    "unknown dtype": (_set(["tensors", 0, "dtype"], "float128"), r"tensors\[0\].*unknown dtype 'float128'"),
    "missing dtype": (_delete(["tensors", 1, "dtype"]), r"tensors\[1\].*unknown dtype None"),
    "shape not a list": (_set(["tensors", 0, "shape"], 4), r"tensors\[0\].*shape must be a list"),
    "too many dims": (_set(["tensors", 0, "shape"], [1] * 65), r"tensors\[0\].*at most 64 dimensions"),
    "negative dim": (_set(["tensors", 0, "shape"], [-4]), r"tensors\[0\]\.shape.*got -4"),
    "huge dim": (_set(["tensors", 0, "shape"], [2**60]), r"tensors\[0\]\.shape.*got 1152921504606846976"),
    "float dim": (_set(["tensors", 0, "shape"], [4.0]), r"tensors\[0\]\.shape.*got 4\.0"),
    "huge shape product": (
        _set(["tensors", 0, "shape"], [2**48, 2**48]),
        r"tensors\[0\].*shape \[281474976710656, 281474976710656\] of float32 does not take 16 bytes",
    ),
    "nbytes too small for shape": (
        _set(["tensors", 0, "nbytes"], 12),
        r"tensors\[0\].*shape \[4\] of float32 does not take 12 bytes",
    ),
    "nbytes larger than data": (_set(["tensors", 0, "nbytes"], 4096), r"tensors\[0\]\.nbytes.*got 4096"),
    "unaligned offset": (_set(["tensors", 1, "offset"], 72), r"tensors\[1\].*offset 72 is unaligned"),
    "tensor past raw_bytes": (
        _set(["tensors", 1, "offset"], 128),
        r"tensors\[1\].*offset 128 is unaligned or runs past the data",
    ),
    "offset past raw_bytes": (_set(["tensors", 1, "offset"], 192), r"tensors\[1\]\.offset.*got 192"),
    "negative offset": (_set(["tensors", 0, "offset"], -64), r"tensors\[0\]\.offset.*got -64"),
    "tensors not a list": (_set(["tensors"], {}), r"\(tensors\).*expected a list"),
    "tensor not an object": (_set(["tensors", 0], [1]), r"tensors\[0\].*expected an object"),
    "chunk name with ..": (
        _set(["chunks", 0, "file"], "../data-00000.bin"),
        r"chunks\[0\].*'\.\./data-00000\.bin' is not of the form data-NNNNN\.bin",
    ),
    "chunk name ..": (_set(["chunks", 0, "file"], ".."), r"chunks\[0\].*not of the form"),
    "chunk name with slash": (_set(["chunks", 1, "file"], "sub/data-00000.bin"), r"chunks\[1\].*not of the form"),
    "absolute chunk name": (_set(["chunks", 0, "file"], "/etc/passwd"), r"chunks\[0\].*'/etc/passwd' is not of"),
    "absolute data-like name": (_set(["chunks", 0, "file"], "/tmp/data-00000.bin"), r"chunks\[0\].*not of the form"),
    "chunk name with nul": (_set(["chunks", 0, "file"], "data-00000.bin\x00x"), r"chunks\[0\].*not of the form"),
    "chunk name not a string": (_set(["chunks", 0, "file"], 0), r"chunks\[0\].*not of the form"),
    "chunk raw gap": (_set(["chunks", 1, "raw_offset"], 70), r"chunks\[1\].*raw range starts at 70, expected 64"),
    "chunk raw overlap": (_set(["chunks", 1, "raw_offset"], 32), r"chunks\[1\].*raw range starts at 32, expected 64"),
    "first chunk not at zero": (_set(["chunks", 0, "raw_offset"], 64), r"chunks\[0\].*starts at 64, expected 0"),
    "chunks short of raw_bytes": (_set(["raw_bytes"], 192), r"\(raw_bytes\).*192 is more than the tensors"),
    "numpy leaf of a dtype numpy lacks": (
        _set(["tensors", 1, "dtype"], "bfloat16"),
        r"numpy leaf cannot hold bfloat16",
    ),
    "device leaf torch rejects": (_set(["tree", "d", 1, 1, "l", 1], {"dev": "bogus"}), r"unknown device"),
    "chunk past raw_bytes": (_set(["chunks", 1, "raw_length"], 128), r"chunks\[1\].*runs past raw_bytes"),
    "overlapping chunks in a file": (_set(["chunks", 1, "offset"], 10), r"chunks\[1\].*overlaps the previous chunk"),
    "zero raw_length": (_set(["chunks", 1, "raw_length"], 0), r"chunks\[1\]\.raw_length.*got 0"),
    "huge chunk length": (_set(["chunks", 0, "length"], 2**40), r"chunks\[0\]\.length.*got 1099511627776"),
    "unknown codec": (_set(["chunks", 0, "codecs", 1], {"id": "lz4"}), r"chunks\[0\].*unknown codec.*lz4"),
    "codec with extra params": (
        _set(["chunks", 0, "codecs", 1], {"id": "zstd", "level": 1, "dict": "x"}),
        r"chunks\[0\]\): codec 'zstd' takes the parameters \['level'\], got \['dict', 'level'\]",
    ),
    "codec missing params": (
        _set(["chunks", 0, "codecs", 0], {"id": "bytegroup"}),
        r"chunks\[0\]\): codec 'bytegroup' takes the parameters \['size'\], got \[\]",
    ),
    "codec not an object": (_set(["chunks", 0, "codecs", 0], "zstd"), r"chunks\[0\]\.codecs.*expected an object"),
    "too many codecs": (_set(["chunks", 0, "codecs"], [{"id": "zstd", "level": 1}] * 5), r"at most 4 codecs"),
    "bytegroup size not dividing raw_length": (
        _set(["chunks", 0, "codecs", 0, "size"], 3),
        r"chunks\[0\].*raw_length is not a multiple of the byte-group size",
    ),
    "bytegroup size too large": (_set(["chunks", 0, "codecs", 0, "size"], 64), r"codecs\.size.*got 64"),
    "zstd level out of range": (_set(["chunks", 0, "codecs", 1, "level"], 99), r"codecs\.level.*got 99"),
    "uncompressed chunk with wrong length": (
        _set(["chunks", 1, "length"], 63),
        r"chunks\[1\].*an uncompressed chunk must store exactly raw_length bytes",
    ),
    "crc32 out of range": (_set(["chunks", 0, "crc32"], 2**32), r"chunks\[0\]\.crc32.*got 4294967296"),
    "stored_bytes mismatch": (_set(["stored_bytes"], 95), r"stored_bytes.*does not equal the sum of chunk lengths"),
    "tree not an object": (_set(["tree"], []), r"\(tree\).*expected an object"),
    "tree node with unknown kind": (_set(["tree", "d", 1, 1, "l", 3], {"x": 1}), r"tree.*unknown node kind 'x'"),
    "tree node with two kinds": (_set(["tree", "d", 1, 1, "l", 3], {"v": 1, "T": 0}), r"tree.*exactly one kind"),
    "tree node not an object": (_set(["tree", "d", 1, 1, "l", 3], 5), r"tree.*node '5' is not an object"),
    "tree tensor index out of range": (
        _set(["tree", "d", 1, 1, "l", 0], {"T": 2}),
        r"tree tensor index.*\[0, 1\], got 2",
    ),
    "tree negative tensor index": (_set(["tree", "d", 0, 1, "o", "d", 0, 1], {"T": -1}), r"tree tensor index.*got -1"),
    "tree numpy index out of range": (_set(["tree", "d", 1, 1, "l", 1], {"N": 7}), r"tree tensor index.*got 7"),
    "tree dict entry with bool key": (_set(["tree", "d", 1, 0], True), r"tree.*str-or-int key"),
    "tree dict entry not a pair": (_set(["tree", "d", 1], ["k"]), r"tree.*str-or-int key, node\] pairs"),
    "tree value leaf holding a list": (_set(["tree", "d", 1, 1, "l", 3], {"v": [1]}), r"tree.*value leaf"),
    "tree unknown dtype leaf": (_set(["tree", "d", 1, 1, "l", 5], {"dt": "float128"}), r"unknown dtype leaf"),
    "tree bad device leaf": (_set(["tree", "d", 1, 1, "l", 6], {"dev": "../cuda"}), r"bad device leaf"),
    "metrics not an object": (_set(["metrics"], [1]), r"\(metrics\).*expected an object"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_manifest_is_rejected_saying_what_is_wrong(case):
    mutate, message = CASES[case]
    b = body()
    mutate(b)
    with pytest.raises(CheckpointError, match=message):
        parse_manifest(encode(b))


def test_no_tensors_makes_every_tensor_index_invalid():
    b = body()
    b.update(tensors=[], chunks=[], raw_bytes=0, stored_bytes=0, tree={"T": 0})
    with pytest.raises(CheckpointError, match="tree tensor index"):
        parse_manifest(encode(b))


def test_chunk_file_name_with_a_trailing_newline_is_rejected():
    """``$`` in the data-file pattern also matches before a final newline."""
    b = body()
    b["chunks"][0]["file"] = "data-00000.bin\n"
    with pytest.raises(CheckpointError, match="not of the form data-NNNNN.bin"):
        parse_manifest(encode(b))


# Values of the wrong JSON type in fields the parser looks up in a dict or converts to float:
# each must be a CheckpointError, not a TypeError or OverflowError from deep inside.
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set(["tensors", 0, "dtype"], ["float32"]), r"tensors\[0\].*dtype"),
        (_set(["tensors", 0, "dtype"], {"name": "float32"}), r"tensors\[0\].*dtype"),
        (_set(["chunks", 0, "codecs", 1, "id"], ["zstd"]), r"chunks\[0\].*codec"),
        (_set(["tree", "d", 1, 1, "l", 5], {"dt": ["float32"]}), r"tree.*dtype"),
        (_set(["created"], 10**400), r"created"),
    ],
    ids=["dtype-list", "dtype-object", "codec-id-list", "dtype-leaf-list", "created-huge-int"],
)
def test_wrong_json_types_are_checkpoint_errors(mutate, message):
    b = body()
    mutate(b)
    with pytest.raises(CheckpointError, match=message):
        parse_manifest(encode(b))


# ---- property: random corruption never escapes as anything but CheckpointError ------------------

_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, 1, -1, 63, 64, 128, 2**32, 2**48, 2**63, 10**400, -(10**400)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["float32", "T", "d", "l", "o", "v", "zstd", "bytegroup", "data-00000.bin", "..", "/x"])
)
json_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from _paths(value, (*prefix, index))


def _mutate(root, path, op, value):
    if not path:
        return value if op == "replace" else root
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[f"extra{len(parent)}"] = value
    else:
        parent.insert(last, value)
    return root


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_corruption_gives_a_manifest_or_a_checkpoint_error(data):
    root = body()
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = list(_paths(root))
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["replace", "replace", "delete", "insert"]), label="op")
        value = data.draw(json_values, label="value")
        root = _mutate(copy.deepcopy(root), path, op, value)
    raw = json.dumps(root).encode()
    try:
        result = parse_manifest(raw)
    except CheckpointError as exc:
        assert re.match(r"invalid manifest \(", str(exc))
    else:
        assert isinstance(result, Manifest)


def test_padding_beyond_alignment_is_rejected():
    """Chunks that cover no tensor would let a tiny file make a reader decode gigabytes."""
    b = body()
    b["raw_bytes"] = 256
    b["tensors"][1]["offset"] = 192
    b["chunks"][1]["raw_length"] = 192
    b["chunks"][1]["length"] = 192
    b["stored_bytes"] = 30 + 192
    with pytest.raises(CheckpointError, match=r"\(tensors\): a gap of 176 bytes before offset 192"):
        parse_manifest(encode(b))
