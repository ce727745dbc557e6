"""asyncckpt: asynchronous, compressed, checksummed, atomically committed checkpoints for PyTorch."""

from .data import ResumableSampler
from .errors import CheckpointError
from .manager import CheckpointManager, load
from .pipeline import SaveHandle
from .policy import Adaptive, EverySeconds, EverySteps
from .rng import RNGState

__all__ = [
    "Adaptive",
    "CheckpointError",
    "CheckpointManager",
    "EverySeconds",
    "EverySteps",
    "RNGState",
    "ResumableSampler",
    "SaveHandle",
    "load",
]
__version__ = "0.1.0"
