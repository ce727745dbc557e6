"""RNGState: a stateful leaf that captures and restores every random generator a run draws from.

Exact resume needs the generators too: dropout masks, shuffles and augmentations must continue as
if the run had never stopped. Put one in the state (``state["rng"] = asyncckpt.RNGState()``);
its state is captured when the state is saved and restored by ``restore``.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch


class RNGState:
    """Python ``random``, NumPy's global generator, torch CPU and every CUDA device's generator.

    Holds nothing itself: ``state_dict`` reads the generators at the moment the state is saved,
    ``load_state_dict`` sets them. NumPy's is captured when NumPy is imported, CUDA's when CUDA
    is initialised.
    """

    def state_dict(self) -> dict[str, Any]:
        """Capture every generator now.

        Returns:
            ``{"python": ..., "torch": tensor}`` plus ``"numpy"`` (when NumPy is imported) and
            ``"cuda"`` (a tensor per device, when CUDA is initialised); generator states are
            tensors, so they are stored as checkpoint tensors.
        """
        version, internal, gauss_next = random.getstate()
        state: dict[str, Any] = {
            "python": {
                "version": version,
                "state": torch.tensor(internal, dtype=torch.int64),
                "gauss_next": gauss_next,
            },
            "torch": torch.get_rng_state(),
        }
        np = sys.modules.get("numpy")
        if np is not None:
            kind, keys, pos, has_gauss, cached = np.random.get_state()
            state["numpy"] = {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set every generator the state holds (CUDA devices beyond this machine's are ignored).

        Args:
            state: what :meth:`state_dict` returned (tensors may be on any device).

        Raises:
            KeyError: ``state`` lacks ``"python"`` or ``"torch"``.
        """
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
        torch.set_rng_state(state["torch"].cpu())
        if "numpy" in state:
            import numpy as np

            s = state["numpy"]
            keys = s["keys"].cpu().numpy().astype(np.uint32)
            np.random.set_state((s["kind"], keys, s["pos"], s["has_gauss"], s["cached_gaussian"]))
        if "cuda" in state and torch.cuda.is_available():
            for i, gen_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(gen_state.cpu(), i)

    def __repr__(self) -> str:
        return "RNGState()"
