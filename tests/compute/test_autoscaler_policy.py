"""The autoscaling policy over recorded signal traces (one sample per second)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from compute import sizes
from compute.autoscaler import Decision, PolicyConfig, PolicyState, Sample, decide

CFG = PolicyConfig(min_cu=0.25, max_cu=2.0, up_after=3, down_after=30)

# A pgbench run with 4 clients as the sampler saw it on a 2-core machine: CPU in cores, active backends.
PGBENCH = [(1.31, 2), (1.62, 4), (1.48, 1), (1.71, 3), (1.55, 0), (1.66, 2), (1.40, 4), (1.58, 1),
           (1.69, 2), (1.52, 3), (1.61, 0), (1.47, 2), (1.73, 4), (1.59, 1), (1.44, 3)]
# Then the clients go away: the checkpointer and autovacuum leave a little noise.
QUIET = [(0.02, 0), (0.0, 0), (0.05, 0), (0.01, 0), (0.0, 0), (0.11, 0), (0.0, 0), (0.03, 0)] * 15
# A web app's bursty trickle: short spikes that never last three seconds.
SPIKY = [(0.9, 1), (1.1, 2), (0.02, 0), (0.8, 1), (0.03, 0), (0.01, 0), (1.2, 1), (0.9, 0), (0.0, 0)] * 6


def trace(points: list[tuple[float, int]]) -> list[Sample]:
    return [Sample(cpu_cores=c, active_backends=a) for c, a in points]


def run(samples: list[Sample], cu: float, cfg: PolicyConfig = CFG) -> tuple[list[float], list[Decision]]:
    state = PolicyState(cu)
    sizes_seen, decisions = [], []
    for s in samples:
        d = decide(state, s, cfg)
        state = d.state
        sizes_seen.append(d.cu)
        decisions.append(d)
    return sizes_seen, decisions


def test_idle_at_minimum_holds() -> None:
    cus, decisions = run(trace(QUIET), 0.25)
    assert set(cus) == {0.25}
    assert {d.direction for d in decisions} == {"hold"}


def test_sustained_load_scales_up_within_five_samples() -> None:
    cus, decisions = run(trace(PGBENCH), 0.25)
    first_up = next(i for i, d in enumerate(decisions) if d.direction == "up")
    assert first_up < 5
    # Several steps at once: 1.5 cores of demand needs 2 CU at once, not 0.5 then 1 then 2.
    assert cus[first_up] == 2.0
    assert "load" in decisions[first_up].reason and "0.25 CU" in decisions[first_up].reason
    # And it stays there while the load lasts.
    assert set(cus[first_up:]) == {2.0}


def test_short_spikes_do_not_scale_up() -> None:
    cus, _ = run(trace(SPIKY), 0.25)
    assert set(cus) == {0.25}


def test_down_only_after_cooldown_one_step_at_a_time() -> None:
    cus, decisions = run(trace(PGBENCH + QUIET), 0.25)
    quiet_from = len(PGBENCH)
    downs = [i for i, d in enumerate(decisions) if d.direction == "down"]
    assert downs, "never scaled down"
    assert downs[0] - quiet_from + 1 >= CFG.down_after
    # 2 → 1 → 0.5 → 0.25, each after a fresh cooldown.
    assert [cus[i] for i in downs] == [1.0, 0.5, 0.25]
    assert all(b - a >= CFG.down_after for a, b in zip(downs, downs[1:], strict=False))
    assert cus[-1] == 0.25


def test_clamped_to_max_and_min() -> None:
    heavy = trace([(8.0, 12)] * 10)
    cus, decisions = run(heavy, 0.25, PolicyConfig(min_cu=0.25, max_cu=4.0))
    assert max(cus) == 4.0
    assert decisions[-1].direction == "hold"  # at max: nothing more to do, no repeated "up"
    cus, _ = run(trace(QUIET), 1.0, PolicyConfig(min_cu=0.5, max_cu=2.0, down_after=5))
    assert min(cus) == 0.5


def test_size_outside_range_is_corrected_at_once() -> None:
    d = decide(PolicyState(4.0), Sample(), PolicyConfig(min_cu=0.25, max_cu=2.0))
    assert (d.cu, d.direction) == (2.0, "down")
    d = decide(PolicyState(0.25), Sample(), PolicyConfig(min_cu=1.0, max_cu=2.0))
    assert (d.cu, d.direction) == (1.0, "up")


def test_middle_band_holds() -> None:
    # 0.5 cores on 1 CU: above the low mark, below the high one. Nothing should ever happen.
    cus, _ = run(trace([(0.5, 0)] * 100), 1.0)
    assert set(cus) == {1.0}


def test_a_step_down_does_not_itself_cause_a_step_up() -> None:
    # Just under the low mark at 2 CU; one step down must still be under the high mark at 1 CU.
    load = CFG.low * 2.0 - 0.01
    cus, decisions = run(trace([(load, 0)] * 200), 2.0)
    assert "up" not in {d.direction for d in decisions}
    assert cus[-1] == 1.0


@settings(max_examples=300, deadline=None)
@given(load=st.floats(min_value=0, max_value=20), start=st.sampled_from(sizes.ALLOWED[:8]),
       max_cu=st.sampled_from([1.0, 2.0, 4.0, 8.0]))
def test_constant_load_never_flaps(load: float, start: float, max_cu: float) -> None:
    cfg = PolicyConfig(min_cu=0.25, max_cu=max_cu, up_after=3, down_after=5)
    _, decisions = run([Sample(cpu_cores=load)] * 120, start, cfg)
    moves = [d.direction for d in decisions if d.direction != "hold"]
    # Under a steady load the size moves one way only (after any clamp into range), then settles.
    assert "up" not in moves or "down" not in moves[moves.index("up"):]
    assert "down" not in moves or "up" not in moves[moves.index("down"):]
    assert decisions[-1].direction == "hold"
    assert cfg.min_cu <= decisions[-1].cu <= cfg.max_cu


@settings(max_examples=200, deadline=None)
@given(points=st.lists(st.tuples(st.floats(0, 6), st.integers(0, 8)), min_size=1, max_size=200),
       start=st.sampled_from([0.25, 0.5, 1.0, 2.0]))
def test_any_trace_stays_in_range_and_downs_are_single_steps(points: list[tuple[float, int]], start: float) -> None:
    cus, decisions = run(trace(points), start)
    prev = start
    for cu, d in zip(cus, decisions, strict=True):
        assert CFG.min_cu <= cu <= CFG.max_cu
        if d.direction == "down":
            assert cu == sizes.step(prev, -1)
        if d.direction == "up":
            assert cu > prev
        prev = cu
