"""Where checkpoints live: the storage backend, the commit, the catalog of committed steps."""
