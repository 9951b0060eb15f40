"""The policy component: pure, fed touches in time order."""

from keepwarm.classify import Result
from keepwarm.policy import Decision, FixedPolicy, Source, Touch


def test_fixed_pings_an_interval_after_the_last_ping() -> None:
    policy = FixedPolicy(interval=240.0, jitter=10.0)
    assert policy.next_ping(now=100.0, draw=0.5) == Decision(100.0)
    policy.observe(Touch(100.0, Source.PING, Result.REWARMED))
    assert policy.next_ping(now=101.0, draw=0.5) == Decision(345.0)


def test_fixed_production_touch_moves_the_next_ping_and_says_so() -> None:
    policy = FixedPolicy(interval=240.0, jitter=0.0)
    policy.observe(Touch(100.0, Source.PING, Result.WARM))
    policy.observe(Touch(200.0, Source.PRODUCTION, Result.WARM))
    assert policy.next_ping(now=340.0, draw=0.0) == Decision(440.0, "production_touch")
    # A late-arriving older observation moves nothing.
    policy.observe(Touch(150.0, Source.PRODUCTION, Result.WARM))
    assert policy.next_ping(now=340.0, draw=0.0) == Decision(440.0, "production_touch")


def test_fixed_uncached_production_request_is_no_touch() -> None:
    policy = FixedPolicy(interval=240.0, jitter=0.0)
    policy.observe(Touch(100.0, Source.PING, Result.WARM))
    policy.observe(Touch(200.0, Source.PRODUCTION, Result.UNCACHED))
    assert policy.next_ping(now=300.0, draw=0.0) == Decision(340.0)


def test_fixed_failed_ping_still_anchors_the_next() -> None:
    policy = FixedPolicy(interval=240.0, jitter=0.0)
    policy.observe(Touch(100.0, Source.PING, Result.ERROR))
    assert policy.next_ping(now=101.0, draw=0.0) == Decision(340.0)
