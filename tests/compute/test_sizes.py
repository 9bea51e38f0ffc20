"""The CU table: which sizes exist, and that every setting grows with the size."""

from __future__ import annotations

import pytest

from compute import sizes
from compute.endpoint import ComputeConfigError, EndpointConfig


def _mb(value: str) -> int:
    assert value.endswith("MB")
    return int(value[:-2])


@pytest.mark.parametrize("cu", [0.25, 0.5, 1, 2, 3, 8, 16])
def test_allowed_sizes(cu: float) -> None:
    assert sizes.validate_cu(cu) == float(cu)
    settings = sizes.settings_for(cu)
    assert set(settings) >= {"shared_buffers", "effective_cache_size", "work_mem", "maintenance_work_mem",
                             "max_connections", "max_worker_processes", "max_parallel_workers",
                             "max_parallel_workers_per_gather"}
    assert set(settings) <= sizes.RELOADABLE | sizes.RESTART_ONLY


@pytest.mark.parametrize("cu", [0, 0.1, 0.3, 1.5, 17, 32, -1, "big", None])
def test_rejected_sizes_say_what_is_allowed(cu: object) -> None:
    with pytest.raises(sizes.SizeError, match="use 0.25, 0.5 or a whole number from 1 to 16"):
        sizes.validate_cu(cu)  # type: ignore[arg-type]


def test_settings_grow_with_size() -> None:
    previous: dict[str, str] | None = None
    for cu in sizes.ALLOWED:
        s = sizes.settings_for(cu)
        if previous is not None:
            for name in ("shared_buffers", "effective_cache_size", "work_mem", "maintenance_work_mem"):
                assert _mb(s[name]) > _mb(previous[name]), (name, cu)
            for name in ("max_connections", "max_worker_processes", "max_parallel_workers"):
                assert int(s[name]) >= int(previous[name]), (name, cu)
        previous = s


def test_small_sizes_stay_small() -> None:
    # Many suspended-then-woken computes share one small machine: the smallest must be cheap.
    assert _mb(sizes.settings_for(0.25)["shared_buffers"]) <= 64
    assert _mb(sizes.settings_for(1)["shared_buffers"]) <= 256
    assert int(sizes.settings_for(0.25)["max_parallel_workers_per_gather"]) == 0


def test_restart_only_split() -> None:
    assert {"shared_buffers", "max_connections", "max_worker_processes"} <= sizes.RESTART_ONLY
    assert not sizes.RESTART_ONLY & sizes.RELOADABLE
    live = sizes.reloadable(sizes.settings_for(2))
    assert "work_mem" in live and "shared_buffers" not in live


def test_step_walks_the_table_and_clamps() -> None:
    assert sizes.step(0.25, 1) == 0.5
    assert sizes.step(0.5, 1) == 1
    assert sizes.step(1, -1) == 0.5
    assert sizes.step(0.25, -3) == 0.25
    assert sizes.step(16, 2) == 16
    assert sizes.step(2, 3) == 5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"suspend_timeout": 0.5}, "suspend_timeout = 0.5: must be at least 1 second"),
    ({"min_cu": 0.3}, "min_cu: 0.3 is not a compute size"),
    ({"max_cu": 20}, "max_cu: 20 is not a compute size"),
    ({"min_cu": 4, "max_cu": 2}, "min_cu = 4.0 is above max_cu = 2.0"),
    ({"durability": "maybe"}, "durability = 'maybe'"),
    ({"down_after": 0}, "up_after and down_after"),
])
def test_endpoint_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ComputeConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        EndpointConfig(**kwargs)  # type: ignore[arg-type]


def test_endpoint_config_accepts_the_edges() -> None:
    cfg = EndpointConfig(suspend_timeout=1, min_cu=0.25, max_cu=16)
    assert (cfg.min_cu, cfg.max_cu) == (0.25, 16.0)
