"""The rental policy's rules, one scenario each (the bench proves the numbers)."""

from __future__ import annotations

from hybrid_scheduler.boots import BootHistory, BootStats
from hybrid_scheduler.policy import ActionKind, Candidate, CandidateKind, CandidateState, PolicyConfig, RentalPolicy

STANDBY = BootStats([200.0 + i for i in range(40)], 480.0)  # ~200-240 s
FRESH = BootStats([600.0 + 5 * i for i in range(40)], 1500.0)


def pool(cfg: PolicyConfig) -> list[Candidate]:
    return cfg.pool()


def act(policy: RentalPolicy, now: float, cands: list[Candidate]) -> list[tuple[ActionKind, str]]:
    d = policy.decide(now, 0.0, cands, STANDBY, FRESH)
    return [(a.kind, a.candidate) for a in d.actions]


def starts(policy: RentalPolicy, now: float, cands: list[Candidate]) -> list[tuple[ActionKind, str]]:
    """The decisions other than topping up the pulled reserve."""
    return [a for a in act(policy, now, cands) if a[0] is not ActionKind.PREPULL]


def test_prepull_then_start_at_the_lead_then_drop_the_rest_once_registered() -> None:
    cfg = PolicyConfig(standby_count=3, prepull_lead=1800, deadline_margin=60, retry_allowance=1.0)
    policy = RentalPolicy(cfg)
    cands = pool(cfg)
    d = policy.decide(-4000, 0.0, cands, STANDBY, FRESH)
    assert d.actions == [] and d.wake_at == d.prepull_at
    assert act(policy, -1800, cands) == [(ActionKind.PREPULL, n) for n in "abc"]
    for c in cands[:3]:
        c.state = CandidateState.STOPPED
    lead = policy.lead(STANDBY, FRESH)
    assert 60 + 230 < lead < 60 + 240 + 230  # p90 + margin + one median
    assert act(policy, -lead - 1, cands) == []
    assert act(policy, -lead, cands) == [(ActionKind.START, "a")]
    cands[0].state, cands[0].started_at = CandidateState.STARTING, -lead
    assert starts(policy, -lead + 10, cands) == []  # on track: nothing more
    cands[0].state = CandidateState.READY
    assert act(policy, -lead + 200, cands) == [(ActionKind.DROP, "b"), (ActionKind.DROP, "c")]


def test_a_failure_starts_the_next_standby_at_once_and_an_overdue_boot_is_hedged() -> None:
    cfg = PolicyConfig(standby_count=3, deadline_margin=60)
    policy = RentalPolicy(cfg)
    cands = pool(cfg)
    for c in cands[:3]:
        c.state = CandidateState.STOPPED
    lead = policy.lead(STANDBY, FRESH)
    cands[0].state, cands[0].started_at = CandidateState.FAILED, -lead
    assert starts(policy, -lead + 30, cands) == [(ActionKind.START, "b")]
    cands[1].state, cands[1].started_at = CandidateState.STARTING, -lead + 30
    # one pulled standby left: the reserve is topped up
    assert (ActionKind.PREPULL, "d") in act(policy, -lead + 31, cands)
    # b has run longer than every measured boot: not on track any more, the next one starts
    assert starts(policy, -lead + 30 + 250, cands) == [(ActionKind.START, "c")]


def test_last_call_keeps_two_in_flight_and_slow_hosts_are_replaced() -> None:
    cfg = PolicyConfig(standby_count=3, deadline_margin=60)
    policy = RentalPolicy(cfg)
    cands = pool(cfg)
    for c in cands[:3]:
        c.state = CandidateState.STOPPED
    last_call = policy.last_call(0.0, STANDBY, FRESH)
    cands[0].state, cands[0].started_at = CandidateState.STARTING, last_call - 5
    assert starts(policy, last_call + 1, cands) == [(ActionKind.START, "b")]
    cands[0].slow = True
    cands[1].state, cands[1].started_at = CandidateState.STARTING, last_call + 1
    cands[2].state, cands[2].started_at = CandidateState.STARTING, last_call + 1
    assert starts(policy, last_call + 2, cands) == [(ActionKind.DROP, "a")]


def test_past_the_deadline_everything_is_dropped_and_the_miss_reported() -> None:
    cfg = PolicyConfig(standby_count=2)
    policy = RentalPolicy(cfg)
    cands = pool(cfg)
    cands[0].state, cands[0].started_at = CandidateState.STARTING, -100
    cands[1].state = CandidateState.STOPPED
    d = policy.decide(1.0, 0.0, cands, STANDBY, FRESH)
    assert d.missed and {a.candidate for a in d.actions} == {"a", "b"}


def test_fresh_strategy_and_fallback() -> None:
    cfg = PolicyConfig(strategy="fresh", fresh_count=2)
    policy = RentalPolicy(cfg)
    cands = pool(cfg)
    assert [c.kind for c in cands] == [CandidateKind.FRESH, CandidateKind.FRESH]
    lead = policy.lead(STANDBY, FRESH)
    assert lead > FRESH.quantile(0.9)
    assert act(policy, -lead, cands) == [(ActionKind.RENT, "a")]


def test_no_standby_left_falls_back_to_a_fresh_rental() -> None:
    cfg = PolicyConfig(standby_count=1, standby_pool=1, fresh_count=1)
    policy = RentalPolicy(cfg)
    cands = pool(cfg)
    cands[0].state = CandidateState.FAILED
    assert act(policy, -100, cands) == [(ActionKind.RENT, "b")]


def test_policy_durations_scale_with_the_profile() -> None:
    cfg = PolicyConfig().scaled(1 / 60)
    assert cfg.prepull_lead == PolicyConfig().prepull_lead / 60
    assert cfg.lead_quantile == PolicyConfig().lead_quantile


def test_boot_history_censoring_keeps_long_boots_visible() -> None:
    h = BootHistory()
    for i in range(20):
        h.record("standby", "p", "g", 100.0 + i)
    naive = h.stats("standby", "p", 1.0).quantile(0.9)
    for _ in range(20):
        h.record("standby", "p", "g", 115.0, censored=True)  # hedge losers dropped at 115 s
    censored = h.stats("standby", "p", 1.0).quantile(0.9)
    assert censored >= naive
    stats = h.stats("standby", "p", 1.0)
    assert stats.remaining(0.0, 0.5) is not None
    assert stats.finished == 20 and stats.censored == 20
