"""asyncckpt.codec.libzstd: the system zstd with Huffman-coded literals at acceleration 64."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zstandard

from asyncckpt.codec import libzstd


@pytest.fixture
def compressor() -> libzstd.PlaneCompressor:
    found = libzstd.plane_compressor()
    if found is None:
        if libzstd._load() is None:
            pytest.skip("no system zstd library here: python-zstandard encodes the planes")
        raise AssertionError("the system zstd library loads, but the exponent-plane setting is not available")
    return found


def exponent_like(n: int = 1 << 18, seed: int = 0) -> np.ndarray:
    """Bytes as an fp32 exponent plane of trained weights holds them: a narrow bell of values."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.normal(120, 2.5, n)), 0, 255).astype(np.uint8)


def test_a_frame_is_plain_zstd_that_declares_its_size(compressor):
    src = exponent_like()
    dst = np.empty(src.size, dtype=np.uint8)
    n = compressor.compress_into(src, dst)
    frame = dst[:n].tobytes()
    assert 0 < n < src.size // 2
    assert zstandard.frame_content_size(frame) == src.size
    assert zstandard.ZstdDecompressor().decompress(frame) == src.tobytes()


def test_huffman_literals_at_acceleration_beat_the_bindings_best_setting_on_exponents(compressor):
    src = exponent_like()
    dst = np.empty(src.size, dtype=np.uint8)
    ours = compressor.compress_into(src, dst)
    params = zstandard.ZstdCompressionParameters.from_level(1, hash_log=6, target_length=64, write_content_size=True)
    accelerated = zstandard.ZstdCompressor(compression_params=params).compress(src.tobytes())
    # without the literal-mode parameter, acceleration stores literals raw: no compression at all
    assert len(accelerated) > 0.95 * src.size
    assert ours < 0.6 * src.size


def test_a_frame_that_does_not_fit_returns_zero(compressor):
    src = np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8)
    dst = np.empty(src.size, dtype=np.uint8)  # random bytes: the frame is a little longer
    assert compressor.compress_into(src, dst) == 0


def test_each_thread_has_its_own_context():
    seen: list[libzstd.PlaneCompressor | None] = []
    thread = threading.Thread(target=lambda: seen.append(libzstd.plane_compressor()))
    thread.start()
    thread.join()
    assert seen[0] is not None and seen[0] is not libzstd.plane_compressor()


def test_find_library_runs_only_where_the_usual_names_do_not_load(monkeypatch):
    """find_library runs ldconfig (or a compiler) in a subprocess: not needed where
    ``libzstd.so.1`` loads by name."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL("libzstd.so.1")
    except OSError:
        pytest.skip("libzstd.so.1 does not load by name here")

    def refuse(name: str) -> str | None:
        raise AssertionError(f"find_library({name!r}) ran")

    monkeypatch.setattr(ctypes.util, "find_library", refuse)
    assert libzstd._load() is not None
