"""``Computes`` over the control plane in this process (``compute.Endpoints``): what the workers'
requests reach through the link (``workers.py``), and what a ``DataAPI`` built in the same
process as the control plane uses (the tests do)."""

from __future__ import annotations

from compute import Endpoints, LoadSignals, UnknownBranch, WakeError
from dataapi.databases import Address, NoSuchBranch, WakeFailed


class LocalComputes:
    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints

    async def ensure_ready(self, branch: str) -> Address:
        try:
            return await self.endpoints.ensure_ready(branch)
        except UnknownBranch as e:
            raise NoSuchBranch(str(e)) from None
        except WakeError as e:
            raise WakeFailed(str(e)) from None

    def signals(self, branch: str) -> LoadSignals:
        return self.endpoints.signals(branch)

    def known(self, branch: str) -> Address | None:
        return None  # ensure_ready is a look at the live endpoint: always ask

    def forget(self, branch: str) -> None:
        """Nothing is cached here: ``ensure_ready`` looks at the live endpoint every time."""


__all__ = ["LocalComputes"]
