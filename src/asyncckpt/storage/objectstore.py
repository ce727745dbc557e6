"""The object-store backend: a checkpoint root at a URL (``s3://bucket/prefix``), through obstore
(S3, and Google Cloud Storage / Azure where obstore knows the URL) or, for any other scheme fsspec
knows (``memory://``, ``gcs://`` with gcsfs...), through fsspec.

:class:`ObjectStoreBackend` implements :mod:`asyncckpt.storage.backend`'s protocol with
``atomic_rename=False``: steps are committed by writing the manifest last
(:class:`~asyncckpt.storage.commit.ManifestLastCommit`). What an object store gives and how it is used:

* A data object is a multipart upload streamed as the writer appends: parts of ``part_size`` bytes,
  up to ``upload_concurrency`` of them in flight, so a stream holds about their product in memory,
  never the whole object. S3 takes at most 10,000 parts, so parts of ``part_size`` cap an object
  (8 MiB: about 78 GiB); a writer that knows the object's size (a save passes its raw size) gets
  parts large enough for it, and an append beyond the cap fails there, naming the object.
  ``finish`` completes the upload (the object is durable and visible when it returns); ``abort``
  aborts it, leaving no object and no parts.
* Small objects (manifests) are created with a conditional put (``If-None-Match: *``): an existing
  name is refused by the store itself, so two writers can never both publish the same manifest name.
* Reads are ranged GETs conditional on the ETag seen when the object was opened: an object replaced
  under a reader fails the read rather than mixing two versions.
* There are no directories: a "directory" is a prefix with objects under it; listings use the
  delimiter ``/``.
* The writer lock is a lease object (``<root>/.asyncckpt-lease.json``) holding the writer's host,
  pid, a random token and an expiry, created only where none exists and renewed by a thread with a
  conditional overwrite (``If-Match`` on its ETag). See "Object stores" in docs/design.md for what it
  guarantees and what it does not.

Options (``storage_options``) follow fsspec's names (``key``, ``secret``, ``token``,
``endpoint_url``, ``region`` or ``client_kwargs={"region_name": ...}``, ``anon``); the environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``) works with no
option at all. asyncckpt's own: ``timeout`` (seconds a request may take, 30), ``connect_timeout``
(5), ``retries`` (3; retries stop after ``timeout * (retries + 1)`` seconds in all),
``lease_seconds`` (60), ``part_size`` (8 MiB), ``upload_concurrency`` (8), and ``client``
(``"fsspec"`` to use fsspec even where obstore could serve the URL).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlparse

from asyncckpt.errors import CheckpointError, RootInUseError, StorageError
from asyncckpt.storage.backend import Capabilities, Entry, ObjectInfo

LEASE_NAME = ".asyncckpt-lease.json"
_MANIFEST = re.compile(r"manifest.*\.json")
_DELETE_BATCH = 1000
_MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
_MAX_PART = 5 << 30  # and on one part's size
_OBSTORE_SCHEMES = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
}
_OWN_OPTIONS = (
    "timeout",
    "connect_timeout",
    "retries",
    "lease_seconds",
    "part_size",
    "upload_concurrency",
    "client",
)


@dataclass(frozen=True)
class _Meta:
    """What a HEAD (or a listing) says of an object."""

    name: str
    size: int
    etag: str | None


class _Missing(Exception):
    """The object is not there (a client's not-found, before the backend decides what it means)."""


class _Exists(Exception):
    """A create-only put found the name taken."""


class _Changed(Exception):
    """A conditional overwrite found another version than the one named."""


# ---- the clients: the few calls the backend makes, over obstore or fsspec -------------------------


class _Writer:
    """A multipart upload under way, over a client's file-like writer: ``write`` (blocks while the
    parts in flight fill the budget), then ``close`` (complete) or ``abort`` (the client's own)."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)

    def close(self) -> None:
        self._file.close()

    def abort(self) -> None:
        raise NotImplementedError


class _Client:
    """The seam between the backend and a client library. Names are relative to the root; errors
    are the library's own (the backend maps them), except the three private markers above."""

    def head(self, name: str) -> _Meta:
        """Raises _Missing."""
        raise NotImplementedError

    def get(self, name: str, limit: int) -> tuple[bytes, _Meta]:
        """The whole object, refused (CheckpointError from the caller) beyond limit. Raises _Missing."""
        raise NotImplementedError

    def get_range(self, name: str, start: int, end: int, etag: str | None) -> bytes:
        """Bytes [start, end), only of the version ``etag`` where the client can say so."""
        raise NotImplementedError

    def put(self, name: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> str | None:
        """Write the whole object; returns its ETag. Raises _Exists (create) or _Changed (if_match)."""
        raise NotImplementedError

    def writer(self, name: str, part_size: int) -> _Writer:
        raise NotImplementedError

    def list_dir(self, prefix: str) -> tuple[list[_Meta], list[str]]:
        """The objects and the common prefixes (their last component) directly under prefix."""
        raise NotImplementedError

    def any_under(self, prefix: str) -> bool:
        raise NotImplementedError

    def find(self, prefix: str) -> list[str]:
        """Every object name under prefix/."""
        raise NotImplementedError

    def list_named(self, start: str) -> Iterator[_Meta]:
        """Every object of the root whose name starts with ``start``, at every depth, in name order."""
        raise NotImplementedError

    def delete(self, names: list[str]) -> None:
        """Missing names are fine."""
        raise NotImplementedError

    def delete_dirs(self, prefixes: list[str]) -> None:
        """Remove the emptied "directories" (deepest first) of stores that keep them; best effort."""
        raise NotImplementedError

    def check_root(self) -> None:
        """One cheap request that fails when the bucket is missing or the credentials are wrong."""
        raise NotImplementedError


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix and name else (prefix or name)


class _ObstoreWriter(_Writer):
    def abort(self) -> None:
        # obstore aborts the multipart upload when its context exits with an exception
        self._file.__exit__(CheckpointError, CheckpointError("aborted"), None)


class _ObstoreClient(_Client):
    def __init__(self, store: Any, part_size: int, concurrency: int) -> None:
        import obstore

        self._obs: Any = obstore  # typed loosely: its stubs name TypedDicts not importable at runtime
        self._store = store
        self._part_size = part_size
        self._concurrency = concurrency

    @staticmethod
    def _meta(raw: dict) -> _Meta:
        return _Meta(str(raw["path"]), int(raw["size"]), raw.get("e_tag"))

    def head(self, name: str) -> _Meta:
        try:
            return self._meta(self._obs.head(self._store, name))
        except FileNotFoundError:
            raise _Missing(name) from None

    def get(self, name: str, limit: int) -> tuple[bytes, _Meta]:
        try:
            result = self._obs.get(self._store, name)
        except FileNotFoundError:
            raise _Missing(name) from None
        meta = self._meta(result.meta)
        if meta.size > limit:
            return b"", meta
        return bytes(result.bytes()), meta

    def get_range(self, name: str, start: int, end: int, etag: str | None) -> bytes:
        options: dict[str, Any] = {"range": (start, end)}
        if etag is not None:
            options["if_match"] = etag
        try:
            return bytes(self._obs.get(self._store, name, options=options).bytes())
        except FileNotFoundError:
            raise _Missing(name) from None

    def put(self, name: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> str | None:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        mode: Any = "create" if create else ({"e_tag": if_match} if if_match is not None else "overwrite")
        try:
            return self._obs.put(self._store, name, data, mode=mode, use_multipart=False)["e_tag"]
        except AlreadyExistsError:
            raise _Exists(name) from None
        except PreconditionError:
            raise (_Exists(name) if create else _Changed(name)) from None

    def writer(self, name: str, part_size: int) -> _Writer:
        w = self._obs.open_writer(self._store, name, buffer_size=part_size, max_concurrency=self._concurrency)
        return _ObstoreWriter(w)

    def list_dir(self, prefix: str) -> tuple[list[_Meta], list[str]]:
        # object_store follows the listing's continuation tokens itself: this is every page
        got = self._obs.list_with_delimiter(self._store, prefix or None)
        # a directory marker (the prefix itself, "" at the root) is no object
        objects = [self._meta(o) for o in got["objects"] if str(o["path"]).rstrip("/") not in ("", prefix)]
        return objects, [p.rsplit("/", 1)[-1] for p in got["common_prefixes"]]

    def _pages(self, prefix: str, chunk_size: int) -> Iterator[list[dict]]:
        return iter(self._obs.list(self._store, prefix or None, chunk_size=chunk_size))

    def any_under(self, prefix: str) -> bool:
        for page in self._pages(prefix, 1):
            if page:
                return True
        return False

    def find(self, prefix: str) -> list[str]:
        return [str(o["path"]) for page in self._pages(prefix, _DELETE_BATCH) for o in page]

    def list_named(self, start: str) -> Iterator[_Meta]:
        # The stores obstore serves (S3, GCS, Azure) list in name order: start after ``start``
        # itself and stop at the first name past its range, so other objects of the root (or of
        # a parent prefix) cost no request.
        for page in self._obs.list(self._store, None, offset=start, chunk_size=_DELETE_BATCH):
            for raw in page:
                meta = self._meta(raw)
                if not meta.name.startswith(start):
                    return
                if not meta.name.endswith("/"):  # a directory marker is no object
                    yield meta

    def delete(self, names: list[str]) -> None:
        for i in range(0, len(names), _DELETE_BATCH):
            try:
                self._obs.delete(self._store, names[i : i + _DELETE_BATCH])
            except FileNotFoundError:
                pass

    def delete_dirs(self, prefixes: list[str]) -> None:
        self.delete([p + "/" for p in prefixes])

    def check_root(self) -> None:
        self._obs.list_with_delimiter(self._store, LEASE_NAME)


class _FsspecWriter(_Writer):
    def __init__(self, file: Any, fs: Any, path: str) -> None:
        super().__init__(file)
        self._fs = fs
        self._path = path

    def abort(self) -> None:
        discard = getattr(self._file, "discard", None)
        if discard is not None:
            with contextlib.suppress(Exception):
                discard()  # fsspec's buffered files: abort the multipart upload, never commit
                self._file.closed = True  # discarded: its finalizer must not try to commit it
        # a filesystem whose files appear when opened (memory://): the name is ours (open_write
        # found nothing there), so remove whatever stands there now
        with contextlib.suppress(Exception):
            if self._fs.exists(self._path):
                self._fs.rm_file(self._path)


class _FsspecClient(_Client):
    """Any filesystem fsspec knows. Without a conditional put in fsspec's interface, create-only
    writes use the filesystem's ``mode="create"`` where it has one (s3fs, memory) and a
    look-then-write otherwise, and conditional overwrites look, then write (a race the obstore client
    does not have)."""

    def __init__(self, fs: Any, root: str, part_size: int) -> None:
        self._fs = fs
        self._root = root.rstrip("/")
        self._part_size = part_size

    def _path(self, name: str) -> str:
        return _join(self._root, name)

    def _name(self, path: str) -> str:
        path = path.rstrip("/")
        root = self._root.lstrip("/")
        path = path.lstrip("/") if self._root.startswith("/") or not path.startswith("/") else path
        return path[len(root) + 1 :] if root and path.startswith(root + "/") else path

    def _etag(self, info: dict, path: str) -> str | None:
        for key in ("ETag", "etag", "e_tag"):
            if info.get(key):
                return str(info[key])
        try:
            return str(self._fs.ukey(path))
        except Exception:  # noqa: BLE001 (a filesystem without checksums: no version to compare)
            return None

    def head(self, name: str) -> _Meta:
        path = self._path(name)
        self._fs.invalidate_cache(path)
        try:
            info = self._fs.info(path)
        except FileNotFoundError:
            raise _Missing(name) from None
        if info.get("type") != "file":
            raise _Missing(name)
        return _Meta(name, int(info.get("size") or 0), self._etag(info, path))

    def get(self, name: str, limit: int) -> tuple[bytes, _Meta]:
        meta = self.head(name)
        if meta.size > limit:
            return b"", meta
        try:
            return bytes(self._fs.cat_file(self._path(name))), meta
        except FileNotFoundError:
            raise _Missing(name) from None

    def get_range(self, name: str, start: int, end: int, etag: str | None) -> bytes:
        try:
            return bytes(self._fs.cat_file(self._path(name), start=start, end=end))
        except FileNotFoundError:
            raise _Missing(name) from None

    def put(self, name: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> str | None:
        path = self._path(name)
        if if_match is not None:
            try:
                current = self.head(name).etag
            except _Missing:
                current = None
            if current != if_match:
                raise _Changed(name)
        if create:
            try:
                self._fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                raise _Exists(name) from None
            except TypeError:  # no mode= here: look, then write
                if self._fs.exists(path):
                    raise _Exists(name) from None
                self._fs.pipe_file(path, data)
            except OSError as exc:
                if "pre-condition" in str(exc) or "PreconditionFailed" in str(exc):
                    raise _Exists(name) from None
                raise
        else:
            self._fs.pipe_file(path, data)
        return self.head(name).etag

    def writer(self, name: str, part_size: int) -> _Writer:
        path = self._path(name)
        try:
            file = self._fs.open(path, "wb", block_size=part_size)
        except TypeError:
            file = self._fs.open(path, "wb")
        return _FsspecWriter(file, self._fs, path)

    def list_dir(self, prefix: str) -> tuple[list[_Meta], list[str]]:
        path = self._path(prefix)
        self._fs.invalidate_cache(path)
        try:
            infos = self._fs.ls(path, detail=True)
        except FileNotFoundError:
            return [], []
        objects, dirs = [], []
        for info in infos:
            if str(info["name"]).strip("/") == path.strip("/"):
                continue  # the listed directory's own marker
            name = self._name(str(info["name"]))
            if name == prefix or not name:
                continue
            if info.get("type") == "directory":
                dirs.append(name.rsplit("/", 1)[-1])
            else:
                objects.append(_Meta(name, int(info.get("size") or 0), self._etag(info, str(info["name"]))))
        return objects, dirs

    def any_under(self, prefix: str) -> bool:
        return bool(self.find(prefix))

    def find(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        self._fs.invalidate_cache(path)
        try:
            found = [self._name(p) for p in self._fs.find(path)]
        except FileNotFoundError:
            return []
        return [n for n in found if n.startswith(prefix + "/")] if prefix else found

    def list_named(self, start: str) -> Iterator[_Meta]:
        self._fs.invalidate_cache(self._root)
        try:
            infos = self._fs.find(self._root, detail=True)
        except FileNotFoundError:
            return
        for path, info in sorted(infos.items()):
            name = self._name(str(path))
            if name.startswith(start) and info.get("type") != "directory":
                yield _Meta(name, int(info.get("size") or 0), self._etag(info, str(path)))

    def delete(self, names: list[str]) -> None:
        for i in range(0, len(names), _DELETE_BATCH):
            batch = [self._path(n) for n in names[i : i + _DELETE_BATCH]]
            try:
                self._fs.rm(batch)
            except FileNotFoundError:
                for path in batch:
                    with contextlib.suppress(FileNotFoundError):
                        self._fs.rm_file(path)
        self._fs.invalidate_cache(self._root)

    def delete_dirs(self, prefixes: list[str]) -> None:
        call_s3 = getattr(self._fs, "call_s3", None)  # s3fs: the directory's key "dir/" itself
        for prefix in prefixes:
            path = self._path(prefix)
            with contextlib.suppress(Exception):
                if call_s3 is not None:
                    bucket, _, key = path.partition("/")
                    call_s3("delete_object", Bucket=bucket, Key=key + "/")
                else:
                    self._fs.rmdir(path)
        self._fs.invalidate_cache(self._root)

    def check_root(self) -> None:
        bucket = self._root.lstrip("/").split("/", 1)[0]
        if self._fs.protocol and "memory" in self._fs.protocol:
            return
        if bucket and not self._fs.exists(bucket):
            raise _Missing(bucket)


# ---- building a client from a URL and options ------------------------------------------------------


def _seconds(value: Any, what: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"storage option {what}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise CheckpointError(f"storage option {what}={value!r} must be positive")
    return seconds


def _whole(value: Any, what: str, unit: str = "") -> int:
    """A count option as an int; anything ``int()`` refuses ("8MiB", None) is named, not a bare
    ValueError."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"storage option {what}={value!r} is not a whole number{unit}") from None


def _s3_config(options: dict[str, Any]) -> dict[str, Any]:
    """fsspec/s3fs option names to obstore's S3 configuration keys (obstore's own names pass)."""
    renames = {
        "key": "access_key_id",
        "secret": "secret_access_key",
        "token": "session_token",
        "endpoint_url": "endpoint",
        "anon": "skip_signature",
    }
    config: dict[str, Any] = {}
    for key, value in options.items():
        if key == "client_kwargs":
            for inner, inner_value in (value or {}).items():
                if inner == "region_name":
                    config["region"] = inner_value
                elif inner == "endpoint_url":
                    config["endpoint"] = inner_value
                else:
                    raise CheckpointError(f"storage option client_kwargs[{inner!r}] is not supported for s3:// roots")
        else:
            config[renames.get(key, key)] = value
    return config


def _make_obstore(
    scheme: str,
    bucket: str,
    prefix: str,
    url: str,
    options: dict[str, Any],
    timeouts: tuple[float, float, int],
    part: int,
    conc: int,
) -> _Client:
    try:
        from obstore import store as obs_store
    except ImportError:
        raise CheckpointError(
            f'{url}: the {scheme}:// backend needs the obstore package: pip install "asyncckpt[s3]"'
        ) from None
    timeout, connect_timeout, retries = timeouts
    client_options: dict[str, Any] = {
        "timeout": datetime.timedelta(seconds=timeout),
        "connect_timeout": datetime.timedelta(seconds=connect_timeout),
    }
    retry_config: dict[str, Any] = {
        "max_retries": retries,
        "retry_timeout": datetime.timedelta(seconds=timeout * (retries + 1)),
        "backoff": {
            "init_backoff": datetime.timedelta(milliseconds=100),
            "max_backoff": datetime.timedelta(seconds=min(5.0, timeout)),
            "base": 2,
        },
    }
    try:
        if _OBSTORE_SCHEMES[scheme] == "s3":
            config = _s3_config(options)
            endpoint = str(
                config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
            )
            if endpoint.startswith("http://"):
                client_options["allow_http"] = True
            store = obs_store.S3Store(
                bucket,
                prefix=prefix or None,
                config=config,  # type: ignore[arg-type]
                client_options=client_options,  # type: ignore[arg-type]
                retry_config=retry_config,  # type: ignore[arg-type]
            )
        else:
            store = obs_store.from_url(  # type: ignore[call-overload]
                f"{scheme}://{bucket}/{prefix}" if prefix else f"{scheme}://{bucket}",
                config=options or None,  # type: ignore[arg-type]
                client_options=client_options,  # type: ignore[arg-type]
                retry_config=retry_config,  # type: ignore[arg-type]
            )
    except Exception as exc:  # noqa: BLE001 (obstore rejects an unknown option or a bad value)
        raise CheckpointError(f"{url}: cannot configure the object store: {_cause(exc)}") from exc
    return _ObstoreClient(store, part, conc)


def _make_fsspec(
    scheme: str, url: str, options: dict[str, Any], timeouts: tuple[float, float, int], part: int
) -> _Client:
    try:
        import fsspec
    except ImportError:
        raise CheckpointError(
            f'no storage backend for scheme {scheme!r} (root {url}): pip install "asyncckpt[fsspec]" '
            "(and the fsspec package for that scheme)"
        ) from None
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise CheckpointError(
            f"no storage backend for scheme {scheme!r} (root {url}): fsspec does not know it"
        ) from None
    except ImportError as exc:
        raise CheckpointError(
            f"no storage backend for scheme {scheme!r} (root {url}): fsspec needs a package for it: {exc}"
        ) from None
    options = dict(options)
    if scheme in ("s3", "s3a"):
        timeout, connect_timeout, retries = timeouts
        if "region" in options:
            options.setdefault("client_kwargs", {})["region_name"] = options.pop("region")
        config = options.setdefault("config_kwargs", {})
        config.setdefault("connect_timeout", connect_timeout)
        config.setdefault("read_timeout", timeout)
        config.setdefault("retries", {"max_attempts": retries + 1})
        options.setdefault("skip_instance_cache", True)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise CheckpointError(
            f"no storage backend for scheme {scheme!r} (root {url}): fsspec needs a package for it: {exc}"
        ) from None
    except Exception as exc:  # noqa: BLE001 (a filesystem refusing its options)
        raise CheckpointError(f"{url}: cannot open it through fsspec: {_cause(exc)}") from exc
    return _FsspecClient(fs, path, part)


# ---- errors --------------------------------------------------------------------------------------


def _cause(exc: BaseException) -> str:
    """A client error in one line: obstore's message without its debug dump and the server's XML."""
    text = str(exc).split("\n\nDebug source:", 1)[0].strip()
    code = re.search(r"<Code>([^<]+)</Code>", text)
    text = text.split(": <?xml", 1)[0]
    text = " ".join(text.split())
    if code and code.group(1) not in text:
        text += f" ({code.group(1)})"
    return text[:500] or type(exc).__name__


# A status code only where the message gives it as one: a bare "401" also appears in durations
# ("in 100.724013ms"), which made an unreachable endpoint read as denied access.
_DENIED = re.compile(
    r"status(?: code)?:? 40[13]\b|\b40[13] (?:Forbidden|Unauthorized)\b|AccessDenied|SignatureDoesNotMatch"
    r"|InvalidAccessKeyId|InvalidToken|ExpiredToken|Forbidden|Unauthorized"
)
_UNREACHABLE = re.compile(r"error sending request|tcp connect|Connection refused|dns error|timed out|Timeout", re.I)


class ObjectStoreBackend:
    """A checkpoint root in an object store: the :class:`~asyncckpt.storage.backend.Backend`
    protocol over objects named ``<url>/<name>``.

    Nothing is requested from the store until a method needs it; :meth:`lock` checks the bucket
    and the credentials first, so a wrong one is a clear error at open, not at the first save.

    Args:
        url: The root: ``s3://bucket/prefix`` (obstore), ``gs://``/``az://`` (obstore), or any
            scheme fsspec knows (``memory://``...).
        storage_options: Client options, fsspec's names (see the module docstring), plus
            ``timeout``, ``connect_timeout``, ``retries``, ``lease_seconds``, ``part_size``,
            ``upload_concurrency`` and ``client="fsspec"``.

    Raises:
        CheckpointError: No client for the URL's scheme (naming the package to install), or an
            option the client refuses.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        parsed = urlparse(url)
        scheme = parsed.scheme.lower()
        if not scheme or not parsed.netloc:
            raise CheckpointError(f"{url!r} is not an object store URL (scheme://bucket/prefix)")
        if parsed.query or parsed.fragment or url.endswith(("?", "#")):
            # A URL parser takes them off the key, so "exp#1" and "exp#2" would share one prefix.
            raise CheckpointError(
                f"{url!r}: an object store root cannot hold '?' or '#' (the part after it would be "
                "dropped from the key prefix, and roots differing there would share checkpoints); rename the prefix"
            )
        if any(part in (".", "..") for part in parsed.path.split("/")):
            raise CheckpointError(
                f"{url!r}: an object store key prefix is taken literally, '.' and '..' are not "
                "resolved; write the prefix without them"
            )
        self._url = url.rstrip("/")
        self._bucket = parsed.netloc
        self._prefix = parsed.path.strip("/")
        options = dict(storage_options or {})
        own = {key: options.pop(key) for key in _OWN_OPTIONS if key in options}
        timeout = _seconds(own.get("timeout", 30), "timeout")
        connect_timeout = _seconds(own.get("connect_timeout", 5), "connect_timeout")
        retries = _whole(own.get("retries", 3), "retries")
        if retries < 0:
            raise CheckpointError(f"storage option retries={retries} must be 0 or more")
        self._lease_seconds = _seconds(own.get("lease_seconds", 60), "lease_seconds")
        part = _whole(own.get("part_size", 8 << 20), "part_size", " of bytes")
        if part < 5 << 20:
            raise CheckpointError(f"storage option part_size={part} is below the 5 MiB S3 requires of a part")
        conc = max(1, _whole(own.get("upload_concurrency", 8), "upload_concurrency"))
        timeouts = (timeout, connect_timeout, retries)
        self._timeout = timeout
        self._part = part
        client = own.get("client")
        if client not in (None, "obstore", "fsspec"):
            raise CheckpointError(f"storage option client={client!r}: use 'obstore' or 'fsspec'")
        if scheme in _OBSTORE_SCHEMES and client != "fsspec":
            self._client = _make_obstore(scheme, self._bucket, self._prefix, self._url, options, timeouts, part, conc)
        elif client == "obstore":
            raise CheckpointError(f"{url}: obstore does not serve {scheme}:// roots here; leave client unset")
        else:
            self._client = _make_fsspec(scheme, self._url, options, timeouts, part)
        self.capabilities = Capabilities(atomic_rename=False, fsync=False, mmap=False, lock=True, remote=True)
        self._lease: _Lease | None = None
        self._released = False  # it held the lease and closed: check_lock refuses from then on

    @property
    def location(self) -> str:
        """See :meth:`asyncckpt.storage.backend.Backend.location`: the root's URL."""
        return self._url

    def describe(self, name: str) -> str:
        """See :meth:`asyncckpt.storage.backend.Backend.describe`: the object's full URL.

        Args:
            name: A relative name ("" for the root).

        Returns:
            ``<root URL>/<name>``.
        """
        return f"{self._url}/{name}" if name else self._url

    def _fail(self, exc: BaseException, name: str, doing: str) -> NoReturn:
        """Raise the store error ``exc`` as a StorageError naming the object and what to check."""
        where = self.describe(name)
        cause = _cause(exc)
        class_name = type(exc).__name__
        if "NoSuchBucket" in cause or (isinstance(exc, _Missing) and str(exc) == self._bucket):
            message = f"{where}: cannot {doing}: bucket {self._bucket!r} does not exist"
        elif (
            class_name in ("PermissionDeniedError", "UnauthenticatedError")
            or isinstance(exc, PermissionError)
            or _DENIED.search(cause)
        ):
            message = f"{where}: cannot {doing}: access denied, check credentials ({cause})"
        elif _UNREACHABLE.search(cause):
            reached = "the store cannot be reached (connection refused, or no answer within the timeouts)"
            message = f"{where}: cannot {doing}: {reached} ({cause})"
        else:
            message = f"{where}: cannot {doing}: {cause}"
        raise StorageError(message) from exc

    def _call(self, name: str, doing: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (_Missing, _Exists, _Changed, CheckpointError):
            raise
        except Exception as exc:  # noqa: BLE001 (every client error is mapped to a named one)
            self._fail(exc, name, doing)

    # ---- the writer lock --------------------------------------------------------------------------

    def check(self) -> None:
        """Make one request to the root, so a missing bucket, wrong credentials or an unreachable
        endpoint is a clear error now (within the timeouts) rather than at the first save.

        Raises:
            CheckpointError: The bucket is missing, access is denied, or the store cannot be reached.
        """
        try:
            self._client.check_root()
        except _Missing as exc:
            self._fail(exc, "", "open the root")
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "", "open the root")

    def lock(self) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.lock`: take the lease object (after
        checking the bucket and the credentials).

        Raises:
            RootInUseError: Another writer's lease has not expired.
            CheckpointError: The store cannot be used.
        """
        if self._lease is not None:
            return
        self.check()
        lease = _Lease(self, self._lease_seconds)
        lease.acquire()
        self._lease, self._released = lease, False

    def check_lock(self) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.check_lock`: the lease is still ours (its
        version the one this writer last wrote, or one holding its token) and not about to expire
        (renewed here if it is).

        Raises:
            RootInUseError: The lease was lost: taken over, or deleted.
            CheckpointError: The lease could not be renewed in time (a store outage): this write
                only; the lease is kept and renewed once the store answers.
        """
        if self._lease is not None:
            self._lease.check()
        elif self._released:
            # a thread still publishing after close() gave up on it must not write: the root is
            # no longer this writer's
            raise RootInUseError(f"checkpoint root {self.location} was closed by this writer; its lease is released")

    def close(self) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.close`: stop renewing the lease and delete
        it if it is still ours."""
        lease, self._lease = self._lease, None
        if lease is not None:
            self._released = True
            lease.release()

    # ---- writing ----------------------------------------------------------------------------------

    def open_write(self, name: str, size_hint: int | None = None) -> _ObjectWriteStream:
        """See :meth:`asyncckpt.storage.backend.Backend.open_write`: a streamed multipart upload,
        in parts of ``part_size``, or larger ones when ``size_hint`` needs them to stay within
        S3's 10,000 parts (with a quarter to spare).

        Args:
            name: The new object's name.
            size_hint: About how many bytes will be written (None: unknown).

        Returns:
            The stream.

        Raises:
            CheckpointError: The name exists, or the store cannot be used.
        """
        try:
            self._client.head(name)
        except _Missing:
            pass
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, name, "create")
        else:
            raise CheckpointError(f"{self.describe(name)} exists; asyncckpt never overwrites a data object")
        part = self._part
        if size_hint is not None and size_hint > 0:
            needed = -(-(size_hint + size_hint // 4) // _MAX_PARTS)
            part = min(_MAX_PART, max(part, -(-needed // (1 << 20)) << 20))  # whole MiB
        writer = self._call(name, "create", lambda: self._client.writer(name, part))
        return _ObjectWriteStream(self, name, writer, part)

    def write_small(self, name: str, data: bytes) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.write_small`: a create-only put.

        Args:
            name: The new object's name.
            data: Its bytes.

        Raises:
            CheckpointError: The name exists, or the store failed the write.
        """
        try:
            self._call(name, "write", lambda: self._client.put(name, bytes(data), create=True))
        except _Exists:
            raise CheckpointError(f"{self.describe(name)} exists; asyncckpt never overwrites it") from None

    def sync(self, prefix: str) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.sync`: nothing (a completed put is durable).

        Args:
            prefix: Unused.
        """

    # ---- reading ----------------------------------------------------------------------------------

    def _head(self, name: str, doing: str) -> _Meta | None:
        try:
            return self._call(name, doing, lambda: self._client.head(name))
        except _Missing:
            return None

    def open_read(self, name: str) -> _ObjectReadHandle:
        """See :meth:`asyncckpt.storage.backend.Backend.open_read`: a HEAD for the size and ETag.

        Args:
            name: The object's name.

        Returns:
            The handle.

        Raises:
            CheckpointError: The object is missing or cannot be read.
        """
        meta = self._head(name, "open")
        if meta is None:
            raise CheckpointError(f"{self.describe(name)} does not exist")
        return _ObjectReadHandle(self, name, meta)

    def read_small(self, name: str, limit: int) -> bytes:
        """See :meth:`asyncckpt.storage.backend.Backend.read_small`.

        Args:
            name: The object's name.
            limit: The most bytes accepted.

        Returns:
            Its bytes.

        Raises:
            CheckpointError: It is missing, larger than ``limit``, or cannot be read.
        """
        return self.read_versioned(name, limit)[0]

    def read_versioned(self, name: str, limit: int) -> tuple[bytes, str | None]:
        """:meth:`read_small`, with the ETag of the version read: the writer remembers which
        manifest versions it verified, so a listing that shows the same ETag needs no new GET.

        Args:
            name: The object's name.
            limit: The most bytes accepted.

        Returns:
            Its bytes, and the ETag of exactly those bytes (None where the store gives none).

        Raises:
            CheckpointError: It is missing, larger than ``limit``, or cannot be read.
        """
        try:
            data, meta = self._call(name, "read", lambda: self._client.get(name, limit))
        except _Missing:
            raise CheckpointError(f"{self.describe(name)} does not exist") from None
        if meta.size > limit:
            raise CheckpointError(f"{self.describe(name)} is {meta.size} bytes, larger than the {limit} limit")
        return data, meta.etag

    def list_named(self, start: str) -> list[tuple[str, str | None]]:
        """Every object whose name starts with ``start`` (a plain string prefix, not a directory:
        ``"step-"``), at every depth, with its ETag: one listing of the root where the delimited
        one would take a listing per step (paginated, and only over names from ``start`` on).

        Args:
            start: The names' common beginning.

        Returns:
            (name, ETag or None) of each object, in name order.

        Raises:
            CheckpointError: The bucket is missing, or the listing failed.
        """
        try:
            return self._call(start, "list", lambda: [(m.name, m.etag) for m in self._client.list_named(start)])
        except _Missing:
            return []

    def list(self, prefix: str = "") -> list[Entry]:
        """See :meth:`asyncckpt.storage.backend.Backend.list`: one delimited listing (every page).

        Args:
            prefix: A "directory" name ("" for the root).

        Returns:
            Objects as files, common prefixes as directories.

        Raises:
            CheckpointError: The bucket is missing, or the listing failed.
        """
        try:
            objects, dirs = self._call(prefix, "list", lambda: self._client.list_dir(prefix))
        except _Missing:
            return []
        out = [Entry(o.name.rsplit("/", 1)[-1], False) for o in objects]
        return out + [Entry(d, True) for d in dirs]

    def stat(self, name: str) -> ObjectInfo | None:
        """See :meth:`asyncckpt.storage.backend.Backend.stat`: an object, a prefix with objects
        under it ("dir"), or None.

        Args:
            name: A name in the root.

        Returns:
            Its kind and size, or None.
        """
        meta = self._head(name, "stat") if name else None
        if meta is not None:
            return ObjectInfo("file", meta.size)
        if self._call(name, "list", lambda: self._client.any_under(name)):
            return ObjectInfo("dir", 0)
        return None

    def identity(self, name: str) -> Hashable | None:
        """See :meth:`asyncckpt.storage.backend.Backend.identity`.

        An object is its ETag and size; a "directory" is the names and ETags of the manifests
        directly under it, which change when its step is saved again, deleted or re-created.

        Args:
            name: A name in the root.

        Returns:
            A comparable value, or None when nothing is there.
        """
        meta = self._head(name, "stat") if name else None
        if meta is not None:
            return ("object", meta.etag, meta.size)
        try:
            objects, dirs = self._call(name, "list", lambda: self._client.list_dir(name))
        except _Missing:
            return None
        if not objects and not (dirs and self._call(name, "list", lambda: self._client.any_under(name))):
            return None  # nothing, or only the empty "directories" some stores keep
        manifests = sorted(
            (o.name.rsplit("/", 1)[-1], o.etag) for o in objects if _MANIFEST.fullmatch(o.name.rsplit("/", 1)[-1])
        )
        return ("prefix", tuple(manifests))

    # ---- deleting ---------------------------------------------------------------------------------

    def delete(self, name: str) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.delete`.

        Args:
            name: The object's name (missing is fine).

        Raises:
            OSError: The store refused the deletion (a CheckpointError naming the object).
        """
        try:
            self._call(name, "delete", lambda: self._client.delete([name]))
        except _Missing:
            pass

    def delete_tree(self, prefix: str) -> None:
        """See :meth:`asyncckpt.storage.backend.Backend.delete_tree`: every object under
        ``prefix/``, in batches; never raises.

        Args:
            prefix: A "directory" name (never "").

        Raises:
            ValueError: ``prefix`` is the root.
        """
        if not prefix:
            raise ValueError("delete_tree never removes the root")
        try:
            names = self._client.find(prefix)
            self._client.delete(names)
            # Stores with real directories behind their S3 face (SeaweedFS) keep the emptied
            # "directories" and list them as common prefixes; their keys ``dir/`` remove them
            # (deepest first). Elsewhere deleting a key that does not exist is a no-op.
            dirs = {prefix}
            for name in names:
                parts = name.split("/")[:-1]
                dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
            inside = sorted((d for d in dirs if d == prefix or d.startswith(prefix + "/")), key=len, reverse=True)
            self._client.delete_dirs(inside)
        except Exception:  # noqa: BLE001 (the protocol's promise: a sweep removes what is left)
            pass


class _ObjectWriteStream:
    """One data object, uploaded as it is appended (see the module docstring).

    The caller's buffer is copied unless it is immutable bytes: the upload may still be sending a
    part when ``append`` returns, and the caller reuses its buffers."""

    def __init__(self, backend: ObjectStoreBackend, name: str, writer: _Writer, part: int) -> None:
        self._backend = backend
        self.name = name
        self.size = 0
        self._writer: _Writer | None = writer
        self._part = part

    def append(self, data: bytes | memoryview) -> int:
        """See :meth:`asyncckpt.storage.backend.WriteStream.append`."""
        if self._writer is None:
            raise CheckpointError(f"{self._backend.describe(self.name)}: the stream is closed")
        offset = self.size
        view = memoryview(data)
        cap = self._part * _MAX_PARTS
        if offset + view.nbytes > cap:
            # refused now, not after the upload (S3 refuses part 10,001): nothing is completed
            raise StorageError(
                f"{self._backend.describe(self.name)}: cannot upload more than {cap} bytes in {_MAX_PARTS} parts "
                f"of {self._part} bytes (the most S3 takes); set the storage option part_size= larger"
            )
        immutable = isinstance(data, bytes) or (view.readonly and isinstance(view.obj, bytes))
        payload = data if immutable else view.tobytes()
        writer = self._writer
        self._backend._call(self.name, "upload", lambda: writer.write(payload))
        self.size += view.nbytes
        return offset

    def finish(self) -> None:
        """See :meth:`asyncckpt.storage.backend.WriteStream.finish`: complete the upload."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            self._backend._call(self.name, "complete the upload", writer.close)
        except BaseException:
            with contextlib.suppress(Exception):
                writer.abort()
            raise

    def abort(self) -> None:
        """See :meth:`asyncckpt.storage.backend.WriteStream.abort`: abort the multipart upload."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.abort()


class _ObjectReadHandle:
    """An object opened for ranged reads: each ``read_into`` is one GET of the range, conditional on
    the ETag seen at open."""

    def __init__(self, backend: ObjectStoreBackend, name: str, meta: _Meta) -> None:
        self._backend = backend
        self._name = name
        self._etag = meta.etag
        self.size = meta.size

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """See :meth:`asyncckpt.storage.backend.ReadHandle.read_into`."""
        end = min(offset + len(buffer), self.size)
        if end <= offset:
            return 0
        backend, name, etag = self._backend, self._name, self._etag
        try:
            data = backend._call(name, "read", lambda: backend._client.get_range(name, offset, end, etag))
        except _Missing:
            raise StorageError(f"{backend.describe(name)}: cannot read: it no longer exists") from None
        n = len(data)
        buffer[:n] = data
        return n

    def fileno(self) -> int | None:
        """See :meth:`asyncckpt.storage.backend.ReadHandle.fileno`: None (no mapping)."""
        return None

    def close(self) -> None:
        """See :meth:`asyncckpt.storage.backend.ReadHandle.close`: nothing to release."""


# ---- the lease -----------------------------------------------------------------------------------


class _Lease:
    """The writer lock of an object-store root: ``<root>/.asyncckpt-lease.json``.

    Taken with a create-only put; renewed every ``ttl / 3`` by a daemon thread overwriting it only if
    its ETag is still the one last written (sooner after a failure); a lease whose recorded expiry
    is more than ``margin`` past is taken over (also conditionally). Each holder writes a token of
    its own into it: a version this writer did not expect that still holds its token is its own
    (a put applied whose answer was lost), and only another writer's token (or no lease) means it
    is lost. ``check`` says whether this writer may publish now."""

    def __init__(self, backend: ObjectStoreBackend, ttl: float) -> None:
        self._backend = backend
        self._client = backend._client
        self.ttl = ttl
        self.margin = ttl / 4
        self._token = secrets.token_hex(8)
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._etag: str | None = None
        self._expires = 0.0
        self._lost: str | None = None
        self._last_error: str | None = None
        self._guard = threading.Lock()  # a renewal (put + new ETag) against a check (HEAD + compare)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_body: tuple[bytes, float] = (b"", 0.0)

    def _body(self) -> tuple[bytes, float]:
        expires = time.time() + self.ttl
        record = {"host": self._host, "pid": self._pid, "token": self._token, "expires": expires, "ttl": self.ttl}
        return json.dumps(record).encode(), expires

    def _refuse(self, holder: dict, expires: float) -> NoReturn:
        until = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc).isoformat(timespec="seconds")
        same = " (this process)" if holder.get("pid") == self._pid and holder.get("host") == self._host else ""
        raise RootInUseError(
            f"checkpoint root {self._backend.location} is in use by another writer (host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}{same}); its lease {self._backend.describe(LEASE_NAME)} runs until {until} "
            "unless renewed; only one CheckpointManager (or prune) may write to a root at a time"
        )

    def acquire(self) -> None:
        body, expires = self._body()
        try:
            etag = self._backend._call(
                LEASE_NAME, "take the lease", lambda: self._client.put(LEASE_NAME, body, create=True)
            )
        except _Exists:
            etag = self._take_over()
            body, expires = self._last_body
        self._etag, self._expires = etag, expires
        self._thread = threading.Thread(target=self._renew_loop, name="asyncckpt-lease", daemon=True)
        self._thread.start()

    def _take_over(self) -> str | None:
        """The lease exists: refuse if it is live, else replace it (only the version read)."""
        from asyncckpt.format import MAX_MANIFEST_BYTES

        try:
            raw, meta = self._backend._call(
                LEASE_NAME, "read the lease", lambda: self._client.get(LEASE_NAME, MAX_MANIFEST_BYTES)
            )
        except _Missing:  # released meanwhile: try once more from scratch
            body, expires = self._body()
            self._last_body = (body, expires)
            try:
                return self._backend._call(
                    LEASE_NAME, "take the lease", lambda: self._client.put(LEASE_NAME, body, create=True)
                )
            except _Exists:
                raise RootInUseError(
                    f"checkpoint root {self._backend.location} was just locked by another writer"
                ) from None
        try:
            holder = json.loads(raw)
            expires_at = float(holder["expires"])
        except (ValueError, KeyError, TypeError):
            holder, expires_at = {}, 0.0  # not a lease we can read: treat it as expired
        if isinstance(holder, dict) and holder.get("token") == self._token:
            # this writer's own create, applied though its answer was lost (and the put retried)
            self._last_body = (raw, expires_at)
            return meta.etag
        # The margin is the holder's (a quarter of the lifetime it recorded), not this writer's:
        # a dead writer with a short lease does not hold the root for a quarter of ours.
        try:
            margin = float(holder.get("ttl", 4 * self.margin)) / 4
        except (TypeError, ValueError):
            margin = self.margin
        if not 0 <= margin <= self.margin * 64:
            margin = self.margin
        if time.time() < expires_at + margin:
            self._refuse(holder, expires_at)
        body, expires = self._body()
        self._last_body = (body, expires)
        try:
            return self._backend._call(
                LEASE_NAME, "take over the lease", lambda: self._client.put(LEASE_NAME, body, if_match=meta.etag)
            )
        except _Changed:
            raise RootInUseError(
                f"checkpoint root {self._backend.location}: another writer took over its expired lease first"
            ) from None

    def _renew_loop(self) -> None:
        failed = False
        while not self._stop.wait(self._retry_s if failed else self.ttl / 3):
            if os.getpid() != self._pid:
                return
            with self._guard:
                if self._lost is not None:
                    return
                failed = not self._renew()

    @property
    def _retry_s(self) -> float:
        """How soon a failed renewal is tried again: well within what is left of the lease, so a
        store back from an outage finds it renewed before a publish needs it."""
        return min(self.ttl / 12, 5.0)

    def _renew(self) -> bool:
        """Overwrite the lease if it is still the version this writer last wrote (under ``_guard``).

        Returns:
            Whether it is renewed. False when the store did not answer (recorded; tried again), or
            when the lease turned out to be lost (``_lost`` set).
        """
        body, expires = self._body()
        try:
            new = self._client.put(LEASE_NAME, body, if_match=self._etag) if self._etag else None
        except _Changed:
            return self._still_ours()
        except Exception as exc:  # noqa: BLE001 (recorded; a publish past the lease's margin is refused)
            self._last_error = _cause(exc)
            return False
        self._etag, self._expires, self._last_error = new, expires, None
        return True

    def _still_ours(self) -> bool:
        """The lease's version is not the one this writer last wrote: a renewal the store applied
        though its answer was lost (a timeout, a retried put) left this writer's own token in it,
        and then the lease is still this writer's (its version and expiry are taken); another
        writer's token, or no lease, means it is lost for good (under ``_guard``).

        Returns:
            Whether the lease is this writer's. False also when the store could not be read
            (recorded; asked again later).
        """
        from asyncckpt.format import MAX_MANIFEST_BYTES

        try:
            raw, meta = self._client.get(LEASE_NAME, MAX_MANIFEST_BYTES)
        except _Missing:
            self._lost = "its lease was deleted"
            return False
        except Exception as exc:  # noqa: BLE001 (cannot tell now)
            self._last_error = _cause(exc)
            return False
        try:
            holder = json.loads(raw)
            ours = holder.get("token") == self._token
            expires = float(holder["expires"])
        except (ValueError, KeyError, TypeError, AttributeError):
            ours = False
        if not ours:
            self._lost = "its lease was taken over by another writer"
            return False
        self._etag, self._expires, self._last_error = meta.etag, expires, None
        return True

    def check(self) -> None:
        """Whether this writer may publish now: the lease is still its own and not within its
        margin of expiring. Past that margin (renewals failed: a store outage), it is renewed here
        first; if that fails too, this publish is refused but the lease is kept, and publishing
        goes on once the store answers again. Lost for good only when another writer's token is in
        the lease, or the lease is gone.

        Raises:
            RootInUseError: The lease is lost for good.
            CheckpointError: The lease could not be renewed in time (this publish only).
        """
        where = self._backend.location
        with self._guard:
            if self._lost is None:
                try:
                    meta: _Meta | None = self._client.head(LEASE_NAME)
                except _Missing:
                    meta = None
                except Exception as exc:  # noqa: BLE001
                    self._last_error = _cause(exc)
                    meta = _Meta(LEASE_NAME, 0, self._etag)  # cannot tell: rely on the expiry below
                if meta is None:
                    self._lost = "its lease was deleted"
                elif meta.etag != self._etag:
                    self._still_ours()
            if self._lost is None and time.time() > self._expires - self.margin and not self._renew():
                if self._lost is None:
                    raise CheckpointError(
                        f"this writer cannot publish to {where} now: its lease could not be renewed in time "
                        f"({self._last_error or 'renewal stalled'}); it publishes again once the store answers"
                    )
            lost = self._lost
        if lost is not None:
            raise RootInUseError(f"this writer lost checkpoint root {where}: {lost}; nothing more is published")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._backend._timeout * 2)
        if os.getpid() != self._pid:
            return
        with self._guard:
            if self._lost is not None:
                return
            try:
                if self._client.head(LEASE_NAME).etag == self._etag or self._still_ours():
                    self._client.delete([LEASE_NAME])
            except Exception:  # noqa: BLE001 (close never raises; the lease then simply expires)
                pass
