"""A bucket of the test S3 server seen with obstore directly, never through asyncckpt: what is
really stored under a root, and a way to change an object behind asyncckpt's back."""

from __future__ import annotations

import obstore
from obstore.store import S3Store

import _s3server
from asyncckpt.format import parse_manifest


def bucket_store(server: _s3server.S3Server, bucket: str = "ckpt") -> S3Store:
    """An obstore client on ``bucket`` of ``server``."""
    config = {
        "endpoint": server.endpoint,
        "access_key_id": _s3server.ACCESS_KEY,
        "secret_access_key": _s3server.SECRET_KEY,
        "region": _s3server.REGION,
    }
    return S3Store(bucket, config=config, client_options={"allow_http": True})  # type: ignore[arg-type]


def _prefix(url: str) -> str:
    return url.removeprefix("s3://").split("/", 1)[1]


def objects(server: _s3server.S3Server, url: str) -> dict[str, int]:
    """Every object under the root ``url`` of the bucket ``ckpt``: its name relative to the root,
    and its size."""
    prefix = _prefix(url)
    found = {}
    for page in obstore.list(bucket_store(server), prefix + "/"):
        for meta in page:
            path = str(meta["path"])
            if not path.endswith("/"):  # a directory marker some stores keep is no object
                found[path.removeprefix(prefix + "/")] = int(meta["size"])
    return found


def stored_steps(server: _s3server.S3Server, url: str) -> list[int]:
    """The steps with at least one object left under the root."""
    return sorted({int(name.split("/")[0].removeprefix("step-")) for name in objects(server, url) if "/" in name})


def get_object(server: _s3server.S3Server, url: str, name: str) -> bytes:
    """The bytes of the object ``name`` of the root ``url``."""
    return bytes(obstore.get(bucket_store(server), f"{_prefix(url)}/{name}").bytes())


def put_object(server: _s3server.S3Server, url: str, name: str, data: bytes) -> None:
    """Write (or overwrite) the object ``name`` of the root ``url``."""
    obstore.put(bucket_store(server), f"{_prefix(url)}/{name}", data)


def named_by_newest_manifest(server: _s3server.S3Server, url: str, step_dir: str) -> set[str]:
    """The objects of a step that its newest manifest (the highest generation) names: the manifest
    and the files it names (its data files; a multi-rank one's rank tables and data files). Empty
    when the step has no manifest."""
    manifests = sorted(n for n in objects(server, url) if n.startswith(step_dir + "/manifest-"))
    if not manifests:
        return set()
    manifest = parse_manifest(get_object(server, url, manifests[-1]), manifests[-1])
    return {manifests[-1]} | {f"{step_dir}/{name}" for name in manifest.data_files()}


def delete_object(server: _s3server.S3Server, url: str, name: str) -> None:
    """Remove the object ``name`` of the root ``url`` (behind asyncckpt's back)."""
    obstore.delete(bucket_store(server), f"{_prefix(url)}/{name}")
