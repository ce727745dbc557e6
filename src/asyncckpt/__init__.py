"""asyncckpt: asynchronous, compressed, checksummed, atomically committed checkpoints for PyTorch."""

from .aio import AsyncCheckpointManager, AsyncSaveHandle
from .data import ResumableSampler
from .errors import (
    CheckpointDamagedError,
    CheckpointError,
    CheckpointNotFoundError,
    OverlapGuardError,
    RootInUseError,
    SaveFailedError,
    StateMismatchError,
)
from .manager import CheckpointManager, load, load_weights
from .pipeline import SaveHandle
from .policy import Adaptive, EverySeconds, EverySteps
from .rng import RNGState
from .tree import RestoreResult

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
