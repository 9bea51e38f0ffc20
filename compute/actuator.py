"""Applying a compute size: reloadable settings at once, cgroup v2 limits where the cgroup tree
is writable, restart-only settings at the compute's next start."""

from __future__ import annotations

import logging
from pathlib import Path

from compute import sizes
from compute.node import ComputeNode

log = logging.getLogger("lakelet.autoscaler")

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000


class CgroupLimits:
    """CPU and memory limits per compute under ``/sys/fs/cgroup/lakelet/<branch>``; a no-op
    (said once in the log) where cgroup v2 is absent or read-only."""

    def __init__(self, root: Path = CGROUP_ROOT) -> None:
        self.base = root / "lakelet"
        self.usable = self._prepare(root)

    def _prepare(self, root: Path) -> bool:
        try:
            if not (root / "cgroup.controllers").exists():
                raise OSError("cgroup v2 is not mounted")
            self.base.mkdir(exist_ok=True)
            for parent in (root, self.base):
                (parent / "cgroup.subtree_control").write_text("+cpu +memory")
            return True
        except OSError as e:
            log.info("cgroup limits unavailable; sizes apply through Postgres settings only", extra={"why": str(e)})
            return False

    def apply(self, branch: str, cu: float, pids: list[int]) -> None:
        if not self.usable or not pids:
            return
        group = self.base / branch
        try:
            group.mkdir(exist_ok=True)
            (group / "cpu.max").write_text(f"{int(cu * CPU_PERIOD_US)} {CPU_PERIOD_US}")
            (group / "memory.max").write_text(str(int(cu * sizes.MEMORY_MB_PER_CU) << 20))
            for pid in pids:
                (group / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            log.warning("could not apply cgroup limits", extra={"branch": branch, "why": str(e)})


async def apply_size(node: ComputeNode, cu: float, cgroups: CgroupLimits | None) -> None:
    """Reloadable settings now (ALTER SYSTEM + reload); the rest is remembered for the next start."""
    settings = sizes.settings_for(cu)
    await node.apply_settings(sizes.reloadable(settings))
    node.settings.update(settings)
    if cgroups is not None:
        cgroups.apply(node.branch, cu, node.process_ids())
