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
from asyncckpt import CheckpointManager
from conftest import fresh_s3_url

STATE = {"w": torch.arange(1000, dtype=torch.float32), "n": 1}


def _saved(server, steps: int) -> tuple[str, CheckpointManager, CountingBackend]:
    url = fresh_s3_url()
    backend = CountingBackend(url, server.storage_options)
    mgr = CheckpointManager(backend, keep_last=None)  # type: ignore[arg-type]
    for step in range(1, steps + 1):
        mgr.save(step, STATE).wait()
    return url, mgr, backend


def test_load_lists_once_and_reads_each_manifest_once(s3_server):
    url, mgr, _ = _saved(s3_server, 20)
    mgr.close()
    reader = CountingBackend(url, s3_server.storage_options)
    assert asyncckpt.load(reader)["n"] == 1
    # before: 129 (a HEAD, two LISTs and a GET per step); now a GET per step and a constant rest
    assert reader.counts["list_named"] == 1, dict(reader.counts)
    assert reader.reads() <= 20 + 25, dict(reader.counts)
