"""The exceptions users catch for anything that went wrong with a checkpoint.

Every one is a ``CheckpointError``, so a training loop that does not care why needs one ``except``
clause; the subclasses let a caller that does care branch on the type instead of the message. The
low-level cause (OSError, zstd errors, JSON errors) is chained as ``__cause__`` and named in the
message.
"""


class CheckpointError(RuntimeError):
    """A save failed, a checkpoint is damaged or invalid, or the root cannot be used."""


class CheckpointNotFoundError(CheckpointError):
    """The root, the requested step, or any committed checkpoint does not exist."""


class CheckpointDamagedError(CheckpointError):
    """A checkpoint exists but does not verify: a bad checksum, a truncated or missing file, an
    invalid manifest. Readers of a root skip it and fall back to the next older checkpoint."""


class RootInUseError(CheckpointError):
    """Another live writer holds the root's lock."""


class SaveFailedError(CheckpointError):
    """A save failed in the background; raised by the next ``save``, ``wait`` or ``close``, or by
    its handle's ``wait``. Earlier checkpoints are untouched."""


class OverlapGuardError(SaveFailedError):
    """Overlap mode refused to commit a save: a lazily copied tensor changed in place before its
    copy finished, so the checkpoint would have mixed two steps."""


class StateMismatchError(CheckpointError):
    """``restore`` found that the live state and the checkpoint do not fit (missing or unexpected
    keys, shapes, devices); nothing in the live state was touched."""
