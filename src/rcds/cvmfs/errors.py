"""The writer's errors: a change that cannot be made, a tree that cannot be added."""

from __future__ import annotations


class TransactionError(Exception):
    """The requested change is invalid (bad path, missing parent, bad tree)."""


class TreeError(TransactionError):
    """A tree to add is malformed (e.g. a hard link to a path outside it)."""
