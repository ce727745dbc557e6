"""The ``asyncckpt`` command."""

from asyncckpt.cli.commands import main

__all__ = ["main"]
