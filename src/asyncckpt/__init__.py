"""asyncckpt: asynchronous, compressed, checksummed, atomically committed checkpoints for PyTorch.

The files it writes are specified in docs/format.md; how the package is organised, and what a save
and a restore go through, in docs/design.md.
"""

from asyncckpt.aio import AsyncCheckpointManager, AsyncSaveHandle
from asyncckpt.engine.handle import SaveHandle
from asyncckpt.errors import (
    CheckpointDamagedError,
    CheckpointError,
    CheckpointNotFoundError,
    OverlapGuardError,
    RootInUseError,
    SaveFailedError,
    StateMismatchError,
    StorageError,
)
from asyncckpt.loading import load, load_weights
from asyncckpt.manager import CheckpointManager
from asyncckpt.policy import Adaptive, EverySeconds, EverySteps
from asyncckpt.state.data import ResumableSampler
from asyncckpt.state.rng import RNGState
from asyncckpt.state.tree import RestoreResult

__all__ = [
    "Adaptive",
    "AsyncCheckpointManager",
    "AsyncSaveHandle",
    "CheckpointDamagedError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "OverlapGuardError",
    "RootInUseError",
    "SaveFailedError",
    "StateMismatchError",
    "StorageError",
    "CheckpointManager",
    "EverySeconds",
    "EverySteps",
    "RNGState",
    "RestoreResult",
    "ResumableSampler",
    "SaveHandle",
    "load",
    "load_weights",
]
__version__ = "0.1.0"
