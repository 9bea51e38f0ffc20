"""The storage room: branches as timelines over a durable WAL archive and a deduplicated page
store. Imports nothing of Lakelet's other rooms."""

from storage.errors import (
    BranchExists,
    BranchNotFound,
    HasChildren,
    InvalidName,
    InvalidTarget,
    MaterializeError,
    ProtectedBranch,
    StorageError,
)
from storage.store import ADMIN_ROLE, Branch, BranchInfo, GcReport, Materialized, Store

__all__ = [
    "ADMIN_ROLE", "Branch", "BranchExists", "BranchInfo", "BranchNotFound", "GcReport", "HasChildren",
    "InvalidName", "InvalidTarget", "MaterializeError", "Materialized", "ProtectedBranch", "StorageError", "Store",
]
