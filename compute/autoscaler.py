"""The autoscaling policy: a pure function from signals to a size.

No I/O here, so the policy is tested over recorded traces of samples. Reading signals lives in
``signals.py`` and applying a size in ``actuator.py``.

Load is measured in cores' worth of demand: the larger of the compute's CPU use (cores) and its
active backends (each one a query wanting a core) plus the clients waiting in a transaction pool for
a backend (queries wanting one too, not yet running). 1 CU is about one core. The policy
- scales **up** once the load has stayed above ``high`` × size for ``up_after`` samples (3 s by
  default), straight to the smallest size that brings utilisation back under ``high``;
- scales **down** one step only after the load has stayed below ``low`` × size for ``down_after``
  samples (the cooldown), and the streak starts over after every step;
- never flaps: ``low`` × size / next-smaller-size stays below ``high``, so a step down cannot by
  itself trigger a step up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from compute import sizes


@dataclass(frozen=True)
class Sample:
    cpu_cores: float = 0.0
    active_backends: int = 0
    sessions: int = 0
    commits_per_second: float = 0.0
    memory_bytes: int = 0
    waiting: int = 0  # pooled clients in line for a backend

    @property
    def load(self) -> float:
        return max(self.cpu_cores, float(self.active_backends + self.waiting))


@dataclass(frozen=True)
class PolicyConfig:
    min_cu: float = 0.25
    max_cu: float = 2.0
    high: float = 0.7
    low: float = 0.3
    up_after: int = 3
    down_after: int = 30


@dataclass(frozen=True)
class PolicyState:
    cu: float
    high_streak: int = 0
    low_streak: int = 0


@dataclass(frozen=True)
class Decision:
    cu: float
    direction: str  # "up" | "down" | "hold"
    reason: str
    state: PolicyState


def _clamp(cu: float, cfg: PolicyConfig) -> float:
    return max(cfg.min_cu, min(cfg.max_cu, cu))


def _size_for(load: float, cfg: PolicyConfig) -> float:
    """Smallest offered size whose utilisation at ``load`` is under ``high``."""
    for cu in sizes.ALLOWED:
        if load <= cfg.high * cu:
            return _clamp(float(cu), cfg)
    return cfg.max_cu


def decide(state: PolicyState, sample: Sample, cfg: PolicyConfig) -> Decision:
    cu = state.cu
    if cu < cfg.min_cu or cu > cfg.max_cu:
        target = _clamp(cu, cfg)
        return Decision(target, "up" if target > cu else "down", f"outside [{cfg.min_cu}, {cfg.max_cu}] CU",
                        PolicyState(target))
    load = sample.load
    high = load > cfg.high * cu
    low = load < cfg.low * cu
    st = replace(state, high_streak=state.high_streak + 1 if high else 0,
                 low_streak=state.low_streak + 1 if low else 0)
    if st.high_streak >= cfg.up_after and cu < cfg.max_cu:
        target = max(_size_for(load, cfg), sizes.step(cu, 1) if cu < cfg.max_cu else cu)
        target = _clamp(target, cfg)
        reason = f"load {load:.2f} cores > {cfg.high:.0%} of {cu} CU for {st.high_streak} s"
        return Decision(target, "up", reason, PolicyState(target))
    if st.low_streak >= cfg.down_after and cu > cfg.min_cu:
        target = _clamp(sizes.step(cu, -1), cfg)
        reason = f"load {load:.2f} cores < {cfg.low:.0%} of {cu} CU for {st.low_streak} s"
        return Decision(target, "down", reason, PolicyState(target))
    return Decision(cu, "hold", "", st)
