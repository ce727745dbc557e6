"""SIGKILL torture test: kill a saving process inside every phase of a save, check the root."""
