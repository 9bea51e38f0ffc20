"""The storage room's errors: each message is one line naming the problem and what to do."""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error a user can cause in the store."""


class InvalidName(StorageError):
    pass


class BranchExists(StorageError):
    pass


class BranchNotFound(StorageError):
    pass


class HasChildren(StorageError):
    pass


class ProtectedBranch(StorageError):
    pass


class InvalidTarget(StorageError):
    """A point in time or LSN that is in the future, outside the window, or not in the WAL."""


class MaterializeError(StorageError):
    """A data directory could not be built from the store."""
