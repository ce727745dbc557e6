"""Hostile multi-rank manifests and rank tables are refused with clear messages, and a root whose
newest checkpoint is damaged so loads the older valid one (with a warning).

One real 2-rank checkpoint root is written once (a spawned gloo job); every test edits a copy's
JSON and re-seals it with ``format.seal_manifest`` so only the check under test can refuse it.
"""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch

import asyncckpt
from _counting import CountingBackend
from _dist import run_ranks
from _s3bucket import put_object
from _sealing import seal, unseal
from asyncckpt import format as fmt
from asyncckpt.engine.reader import read_manifest
from asyncckpt.errors import CheckpointDamagedError, CheckpointError
from asyncckpt.storage.backend import CheckpointRef
from asyncckpt.storage.catalog import Catalog
from asyncckpt.storage.commit import ManifestLastCommit, published_checkpoints

STEPS = (1, 2)


def _write_root(rank: int, world_size: int, root: str) -> None:
    torch.manual_seed(0)
    model = {"w": torch.randn(33, 8), "b": torch.randn(33), "step": torch.tensor(3.0)}
    with asyncckpt.CheckpointManager(root, replicated=("model",), chunk_size=4096) as mgr:
        for step in STEPS:
            model["w"].add_(1.0)
            mgr.save(step, {"model": model, "own": torch.full((4,), float(rank)), "epoch": step})
            mgr.wait()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranks") / "root"
    run_ranks(_write_root, 2, str(root), timeout=180)
    return root


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    copy = tmp_path / "root"
    shutil.copytree(pristine, copy)
    return copy


def _step_dir(root: Path, step: int = STEPS[-1]) -> Path:
    return root / fmt.step_dir_name(step)


def _manifest_file(d: Path) -> Path:
    names = [p for p in d.iterdir() if p.name.startswith("manifest")]
    assert len(names) == 1, names
    return names[0]


def _edit_table(d: Path, rank: int, edit, reseal_manifest: bool = True) -> None:
    """Edit rank ``rank``'s table, re-seal it, and record its new seal in the manifest."""
    mpath = _manifest_file(d)
    manifest = unseal(mpath.read_bytes())
    entry = manifest["ranks"][rank]
    tpath = d / entry["file"]
    table = unseal(tpath.read_bytes())
    edit(table)
    raw = seal(table)
    tpath.write_bytes(raw)
    if reseal_manifest:
        entry["crc32"] = fmt.seal_of(raw)
        mpath.write_bytes(seal(manifest))


def _refused(d: Path, *needles: str) -> str:
    with pytest.raises(CheckpointDamagedError) as info:
        read_manifest(d)
    text = str(info.value)
    for needle in needles:
        assert needle in text, text
    return text


def test_pristine_reads(root):
    view = read_manifest(_step_dir(root))
    assert isinstance(view, fmt.MultiRankManifest) and view.world_size == 2
    assert view.tables is not None and len(view.tables) == 2
    # the replicated tensors are split: both ranks hold a piece of the (33, 8) tensor
    big = next(i for i, g in enumerate(view.globals) if g.shape == (33, 8))
    assert sorted(rank for rank, _ in view.pieces_of(big)) == [0, 1]
    loaded = asyncckpt.load(root, per_rank="rank0")
    assert loaded["model"]["w"].shape == (33, 8) and loaded["epoch"] == STEPS[-1]


def _piece_of(table: dict) -> list:
    for piece in table["pieces"]:
        tensor = table["tensors"][piece[1]]
        if len(tensor["shape"]) == 2:
            return piece
    raise AssertionError("no 2-D piece")


def test_overlapping_pieces(root):
    d = _step_dir(root)
    table = unseal((d / "rank-00001.json").read_bytes())
    rows = table["tensors"][_piece_of(table)[1]]["shape"][0]

    def edit(t):  # rank 1's piece moved up one row: it overlaps rank 0's, and the last row is bare
        piece = _piece_of(t)
        piece[2][0] -= 1

    _edit_table(d, 1, edit)
    assert rows > 1
    _refused(d, "overlap", "global tensor")


def test_out_of_bounds_piece(root):
    d = _step_dir(root)

    def edit(t):
        _piece_of(t)[2][0] += 1

    _edit_table(d, 1, edit)
    _refused(d, "runs out of", "rank-00001.json")


def test_pieces_not_covering(root):
    d = _step_dir(root)

    def edit(t):  # rank 1 drops its piece of the 2-D tensor
        t["pieces"].remove(_piece_of(t))

    _edit_table(d, 1, edit)
    _refused(d, "do not cover", "global tensor")


def test_rank_table_seal_not_the_committed_one(root):
    d = _step_dir(root)

    # a well-formed table (an extra key) sealed on its own: not the seal the manifest records
    _edit_table(d, 0, lambda t: t.update(extra=1), reseal_manifest=False)
    _refused(d, "rank-00000.json", "is not the rank table the manifest committed")


def test_wrong_rank_in_table(root):
    d = _step_dir(root)
    _edit_table(d, 1, lambda t: t.update(rank=0))
    _refused(d, "is not the table of rank 1 of 2 at step 2")


def test_wrong_step_in_table(root):
    d = _step_dir(root)
    _edit_table(d, 0, lambda t: t.update(step=1))
    _refused(d, "is not the table of rank 0 of 2 at step 2")


def test_chunk_naming_another_ranks_data_file(root):
    d = _step_dir(root)
    other = unseal(_manifest_file(d).read_bytes())["ranks"][0]["data"]

    def edit(t):
        t["chunks"][0]["file"] = other

    _edit_table(d, 1, edit)
    _refused(d, "a chunk names a data file other than", "rank-00001.json")


def test_table_swapped_for_another_ranks(root):
    # rank 1's entry names rank 0's table with its (valid) seal: refused by name or by rank
    d = _step_dir(root)
    mpath = _manifest_file(d)
    manifest = unseal(mpath.read_bytes())
    manifest["ranks"][1]["file"] = manifest["ranks"][0]["file"]
    mpath.write_bytes(seal(manifest))
    _refused(d, "ranks[1]", "rank-00001")


def test_global_leaf_in_version_1_manifest(tmp_path):
    with asyncckpt.CheckpointManager(tmp_path / "v1") as mgr:
        mgr.save(1, {"a": torch.zeros(3), "b": 1})
        mgr.wait()
    d = _step_dir(tmp_path / "v1", 1)
    mpath = _manifest_file(d)
    manifest = unseal(mpath.read_bytes())
    assert manifest["version"] == 1
    text = json.dumps(manifest["tree"])
    assert '{"T": 0}' in text, text
    manifest["tree"] = json.loads(text.replace('{"T": 0}', '{"G": 0}'))
    mpath.write_bytes(seal(manifest))
    _refused(d, "unknown node kind 'G'")


@pytest.mark.parametrize("damage", ["overlap", "seal", "rank", "chunk_file"])
def test_load_falls_back_to_older_step(root, damage):
    d = _step_dir(root)
    if damage == "overlap":
        _edit_table(d, 1, lambda t: _piece_of(t)[2].__setitem__(0, _piece_of(t)[2][0] - 1))
    elif damage == "seal":
        _edit_table(d, 0, lambda t: t.update(extra=1), reseal_manifest=False)
    elif damage == "rank":
        _edit_table(d, 1, lambda t: t.update(rank=0))
    else:
        other = unseal(_manifest_file(d).read_bytes())["ranks"][0]["data"]
        _edit_table(d, 1, lambda t: t["chunks"][0].update(file=other))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = asyncckpt.load(root, per_rank="rank0")
    assert loaded["epoch"] == STEPS[0]
    assert any(
        f"step {STEPS[-1]}" in str(w.message) or fmt.step_dir_name(STEPS[-1]) in str(w.message) for w in caught
    ), [str(w.message) for w in caught]
    with pytest.raises(CheckpointError):
        asyncckpt.load(root, step=STEPS[-1], per_rank="rank0")


class _AtOnce(CountingBackend):
    """A real S3 backend whose GETs of rank tables (and of manifests, once ``gate_manifests`` is
    set) each wait until ``at_once`` of them are in flight together: reading them one at a time
    breaks the barrier, and the read fails."""

    def __init__(self, url: str, at_once: int) -> None:
        super().__init__(url)
        self._barrier = threading.Barrier(at_once, timeout=20)
        self.table_reads: list[str] = []
        self.gate_manifests = False
        counted = self._client

        class _Gated:
            def __getattr__(_, name: str):  # noqa: N805 - the wrapper's own self is unused
                return getattr(counted, name)

            def get(_, name: str, limit: int):  # noqa: N805
                if "/rank-" in name:
                    self.table_reads.append(name.rsplit("/", 1)[-1])
                    self._barrier.wait()
                elif "/manifest" in name and self.gate_manifests:
                    self._barrier.wait()
                return counted.get(name, limit)

        self._client = _Gated()


def _upload(root: Path, url: str, server) -> None:
    """The local root's files under ``url``, each step's manifest as the first generation a
    manifest-last commit writes (a reader verifies it, listing the root)."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        if path.name == fmt.MANIFEST_NAME:
            name = str(path.relative_to(root).with_name(fmt.manifest_generation_name(1)))
        put_object(server, url, name, path.read_bytes())


def test_rank_tables_on_an_object_store_are_fetched_at_once(root, s3_env, s3_server, s3_url):
    _upload(root, s3_url, s3_server)
    backend = _AtOnce(s3_url, at_once=2)
    ref = CheckpointRef(backend, fmt.step_dir_name(STEPS[-1]))
    view = read_manifest(ref)  # the barrier of 2 only opens when both tables are in flight together
    assert sorted(backend.table_reads) == ["rank-00000.json", "rank-00001.json"]
    local = read_manifest(_step_dir(root))
    assert isinstance(view, fmt.MultiRankManifest) and view.tables == local.tables
    # retention's catalog reads the checkpoints' manifests, and each one's tables, at once too
    listed = published_checkpoints(backend)
    backend.table_reads.clear()
    backend.gate_manifests = True
    infos = Catalog(lambda: listed).infos()
    assert [(i.step, i.unreadable) for i in infos] == [(s, None) for s in STEPS]
    assert sorted(backend.table_reads) == sorted(["rank-00000.json", "rank-00001.json"] * len(STEPS))
    # and a reader's listing, and a writer's first one, verify the steps' manifests at once
    assert [c.step for c in published_checkpoints(backend)] == list(STEPS)
    assert [c.step for c in ManifestLastCommit(backend).checkpoints()] == list(STEPS)


def test_the_lowest_failing_rank_names_the_error_when_tables_are_fetched_at_once(root, s3_env, s3_server, s3_url):
    d = _step_dir(root)
    _edit_table(d, 0, lambda t: t.update(rank=1))  # rank 0's says it is rank 1's
    (d / "rank-00001.json").unlink()  # rank 1's is missing
    _upload(root, s3_url, s3_server)
    with pytest.raises(CheckpointDamagedError, match="rank-00000.json") as info:
        read_manifest(CheckpointRef(CountingBackend(s3_url), fmt.step_dir_name(STEPS[-1])))
    assert "rank-00001" not in str(info.value)
    with pytest.raises(CheckpointDamagedError, match="rank-00000.json"):
        read_manifest(d)  # the same error as a local read, which reads them one at a time
