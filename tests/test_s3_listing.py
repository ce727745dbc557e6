"""What listing an ``s3://`` root costs in requests, counted on the real server (tests/_counting.py:
the real backend, its client calls counted), and that the writer's cheaper listing still sees what
changed behind its back.

The writer lists every step's objects in one listing and reads only the manifests whose name and
ETag it has not verified before, so a save costs as many requests with 100 steps kept as with one.
A reader lists once too and reads each step's newest manifest once (no HEAD of ``manifest.json``,
no second listing of a step). A manifest deleted, replaced or added by someone else is seen at the
next listing, as it was when every step was listed and read each time.
"""

from __future__ import annotations

import torch

import asyncckpt
from _counting import CountingBackend
from _s3bucket import delete_object, get_object, objects, put_object
from asyncckpt import CheckpointManager
from asyncckpt.engine.reader import read_checkpoint
from asyncckpt.format import step_dir_name
from asyncckpt.storage.backend import CheckpointRef
from conftest import fresh_s3_url

STATE = {"w": torch.arange(1000, dtype=torch.float32), "n": 1}


def _saved(server, steps: int) -> tuple[str, CheckpointManager, CountingBackend]:
    url = fresh_s3_url()
    backend = CountingBackend(url, server.storage_options)
    mgr = CheckpointManager(backend, keep_last=None)  # type: ignore[arg-type]
    for step in range(1, steps + 1):
        mgr.save(step, STATE).wait()
    return url, mgr, backend


def _requests_of_one_save(server, kept: int) -> tuple[int, dict]:
    _, mgr, backend = _saved(server, kept)
    with mgr:
        backend.reset()
        mgr.save(kept + 1, STATE).wait()
        return backend.reads(), dict(backend.counts)


def test_a_save_costs_as_many_requests_with_100_steps_kept_as_with_1(s3_server):
    one, counts_one = _requests_of_one_save(s3_server, 1)
    hundred, counts_hundred = _requests_of_one_save(s3_server, 100)
    # before: 207 reads with 100 steps kept (a LIST and a GET per step); now the same as with 1
    assert hundred == one, (counts_one, counts_hundred)
    assert counts_hundred["list_named"] == 1 and counts_hundred["get"] == 1, counts_hundred
    assert hundred <= 8, counts_hundred


def test_listing_again_reads_no_manifest_it_verified(s3_server):
    _, mgr, backend = _saved(s3_server, 5)
    with mgr:
        mgr.steps()
        backend.reset()
        assert mgr.steps() == [1, 2, 3, 4, 5]
        assert backend.reads() == 1, dict(backend.counts)  # one listing, no GET


def test_load_lists_once_and_reads_each_manifest_once(s3_server):
    url, mgr, _ = _saved(s3_server, 20)
    mgr.close()
    reader = CountingBackend(url, s3_server.storage_options)
    assert asyncckpt.load(reader)["n"] == 1
    # before: 129 (a HEAD, two LISTs and a GET per step); now a GET per step and a constant rest
    assert reader.counts["list_named"] == 1, dict(reader.counts)
    # before: 20 + 24; now the listing and a GET per step, then the newest step read (14)
    assert reader.reads() <= 20 + 15, dict(reader.counts)


def test_reading_one_checkpoint_takes_its_identity_once(s3_server):
    """A read holds the checkpoint to the identity it takes once (which listing of the step names
    its manifest version), then reads that manifest and its data: 9 requests, and the data's range.
    Before: 17 and the range (the
    identity taken again for the manifest, and a HEAD and a look for a ``manifest.json`` that a
    store's manifest-last commit never writes)."""
    url, mgr, _ = _saved(s3_server, 2)
    mgr.close()
    reader = CountingBackend(url, s3_server.storage_options)
    loaded = read_checkpoint(CheckpointRef(reader, step_dir_name(2)))
    assert torch.equal(loaded.tensors[0], STATE["w"])
    assert reader.reads() == 9, dict(reader.counts)
    assert reader.counts["get"] == 2 and reader.counts["get_range"] == 1, dict(reader.counts)


def _manifest(server, url: str, step: int) -> str:
    names = sorted(n for n in objects(server, url) if n.startswith(f"{step_dir_name(step)}/manifest-"))
    assert len(names) == 1, names
    return names[0]


def test_a_manifest_deleted_behind_the_writer_makes_its_step_gone(s3_server):
    url, mgr, _ = _saved(s3_server, 3)
    with mgr:
        assert mgr.steps() == [1, 2, 3]  # every manifest verified and remembered
        delete_object(s3_server, url, _manifest(s3_server, url, 2))  # data left behind
        assert mgr.steps() == [1, 3]
        for name in [n for n in objects(s3_server, url) if n.startswith(step_dir_name(3) + "/")]:
            delete_object(s3_server, url, name)  # the whole step, by another process
        assert mgr.steps() == [1]


def test_a_manifest_replaced_or_added_behind_the_writer_is_verified_before_it_counts(s3_server):
    url, mgr, backend = _saved(s3_server, 3)
    with mgr:
        assert mgr.steps() == [1, 2, 3]
        name = _manifest(s3_server, url, 2)
        good = get_object(s3_server, url, name)
        put_object(s3_server, url, name, good[:-1] + bytes([good[-1] ^ 1]))  # same name, seal broken
        assert mgr.steps() == [1, 3]
        # a newer generation written by someone else, whole and sealed: the step counts again
        put_object(s3_server, url, f"{step_dir_name(2)}/manifest-000000000007.json", good)
        backend.reset()
        assert mgr.steps() == [1, 2, 3]
        assert backend.counts["get"] == 1, dict(backend.counts)  # only the new manifest was read
        # a newer one that does not verify (a publish cut short) leaves the verified one the step
        put_object(s3_server, url, f"{step_dir_name(3)}/manifest-000000000009.json", b"{cut")
        assert mgr.steps() == [1, 2, 3]
        assert asyncckpt.load(url, step=3, storage_options=s3_server.storage_options)["n"] == 1


def test_retention_still_deletes_through_the_remembered_listing(s3_server):
    url = fresh_s3_url()
    with CheckpointManager(url, keep_last=1, storage_options=s3_server.storage_options) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, STATE).wait()
        assert mgr.steps() == [3]
    assert sorted({n.split("/")[0] for n in objects(s3_server, url) if "/" in n}) == [step_dir_name(3)]
