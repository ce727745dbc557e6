"""A sealed manifest or rank table as a dict and back, for tests that rewrite one on disk."""

from __future__ import annotations

import json
import re

from asyncckpt.format import seal_manifest


def unseal(raw: bytes) -> dict:
    """The JSON object of sealed bytes, without its ``crc32`` seal."""
    match = re.search(rb',"crc32":[0-9]{1,10}\}$', raw)
    assert match is not None, "unsealed"
    return json.loads(raw[: match.start()] + b"}")


def seal(obj: dict) -> bytes:
    """``obj`` written as the writer writes a manifest, sealed."""
    return seal_manifest(json.dumps(obj, separators=(",", ":")).encode())
