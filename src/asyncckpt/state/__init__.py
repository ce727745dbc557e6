"""What a checkpoint holds: the state skeleton, flattening a training state, restoring into it."""
