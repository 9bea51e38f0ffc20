"""Compute sizes: one table from compute units (CU) to Postgres settings.

1 CU is about 2 GB of memory (as in Lakebase). Every memory- and parallelism-related setting is
derived from the CU here and nowhere else.
"""

from __future__ import annotations

MB = 1
GB_MB = 1024
MEMORY_MB_PER_CU = 2 * GB_MB
ALLOWED = (0.25, 0.5, *range(1, 17))

RELOADABLE = frozenset({
    "work_mem", "maintenance_work_mem", "effective_cache_size", "max_parallel_workers",
    "max_parallel_workers_per_gather", "max_parallel_maintenance_workers",
})
RESTART_ONLY = frozenset({"shared_buffers", "max_connections", "max_worker_processes"})


class SizeError(ValueError):
    """A compute size Lakelet does not offer."""


def validate_cu(cu: float) -> float:
    """``cu`` if it is a size Lakelet offers, else SizeError naming the allowed sizes."""
    try:
        value = float(cu)
    except (TypeError, ValueError):
        value = -1.0
    if value not in ALLOWED:
        raise SizeError(f"{cu!r} is not a compute size: use 0.25, 0.5 or a whole number from 1 to 16")
    return value


def settings_for(cu: float) -> dict[str, str]:
    """Postgres settings for a size. shared_buffers stays at 1/8 of the CU's memory (so many small
    computes fit on one machine); the OS page cache does the rest, as effective_cache_size says."""
    cu = validate_cu(cu)
    memory = int(cu * MEMORY_MB_PER_CU)
    cores = max(1, int(cu))
    return {
        "shared_buffers": f"{max(32, memory // 8)}MB",
        "effective_cache_size": f"{memory * 3 // 4}MB",
        "work_mem": f"{max(4, int(16 * cu))}MB",
        "maintenance_work_mem": f"{max(32, memory // 16)}MB",
        "max_connections": str(max(100, min(2000, int(100 * cu)))),
        "max_worker_processes": str(8 + cores),
        "max_parallel_workers": str(cores),
        "max_parallel_workers_per_gather": str(min(4, cores // 2)),
        "max_parallel_maintenance_workers": str(min(4, cores // 2)),
    }


def reloadable(settings: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in settings.items() if k in RELOADABLE}


def step(cu: float, steps: int) -> float:
    """The size ``steps`` places up (or down) the table, clamped to the table's ends."""
    i = ALLOWED.index(validate_cu(cu))
    return float(ALLOWED[max(0, min(len(ALLOWED) - 1, i + steps))])
