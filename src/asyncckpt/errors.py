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


class StorageError(CheckpointError, OSError):
    """The store failed a request: an object store unreachable within the timeouts, access denied,
    a missing bucket. The message names the object and the cause. Also an OSError, as a failed
    write or read of a local file is."""


class RootInUseError(CheckpointError):
    """Another live writer holds the root's lock."""


class SaveFailedError(CheckpointError):
    """A save failed in the background; raised by the next ``save``, ``wait`` or ``close``, or by
    its handle's ``wait``. Earlier checkpoints are untouched."""


class OverlapGuardError(SaveFailedError):
    """Overlap mode refused to commit a save: a lazily copied tensor changed in place before its
    copy finished, so the checkpoint would have mixed two steps."""


class StateMismatchError(CheckpointError):
    """``restore`` or ``load_weights`` found that the live state and the checkpoint do not fit
    (missing or unexpected keys, shapes, meta or unwritable tensors); nothing in the live state was
    touched. The attributes hold the whole lists (the message shows the first few of each):
    paths in the state such as ``state['model'].state_dict()['0.bias']`` (``load_weights``: the
    model's own keys).

    Args:
        message: what does not fit, for people.
        missing_keys: in the live state, not in the checkpoint.
        unexpected_keys: in the checkpoint, not in the live state.
        skipped: live tensors that cannot be written in place.

    Attributes:
        missing_keys: as given, a tuple.
        unexpected_keys: as given, a tuple.
        skipped: as given, a tuple.
    """

    def __init__(
        self,
        message: str,
        *,
        missing_keys: tuple[str, ...] = (),
        unexpected_keys: tuple[str, ...] = (),
        skipped: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.missing_keys = tuple(missing_keys)
        self.unexpected_keys = tuple(unexpected_keys)
        self.skipped = tuple(skipped)
