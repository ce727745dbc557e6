"""The one exception type users catch for anything that went wrong with a checkpoint."""


class CheckpointError(RuntimeError):
    """A save failed, a checkpoint is damaged or invalid, or the root cannot be used.

    Raised instead of the low-level cause (OSError, zstd errors, JSON errors) so a training loop
    needs one ``except`` clause; the cause is chained (``__cause__``) and named in the message.
    """
