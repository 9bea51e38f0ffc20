"""What the proxy needs from the compute room, and nothing more."""

from __future__ import annotations

from typing import Protocol

from compute import ComputeAddress, LoadSignals


class ComputeProvider(Protocol):
    def has_branch(self, branch: str) -> bool: ...
    def role_verifier(self, branch: str, role: str) -> str | None: ...
    def signals(self, branch: str) -> LoadSignals: ...
    async def ensure_ready(self, branch: str) -> ComputeAddress: ...
