"""``decide_fallback``: what follows a run that died for infrastructure reasons, decided without an executor."""

from __future__ import annotations

import pytest

from hybrid_router.child_protocol import InfrastructureFailure
from hybrid_router.router import audit
from hybrid_router.router.fallback import (
    ExhaustedCause,
    FallbacksExhausted,
    NextTryRoute,
    NothingToDo,
    RerunSameTry,
    RouteNextTry,
    decide_fallback,
)

TIMEOUT = InfrastructureFailure(reason="timeout", detail="Task timed out after 900.00 seconds")
CHILDREN = ("lambda", "ecs", "local", "batch")


def decide(
    *,
    fallback=("ecs", "local"),
    tried=("lambda",),
    fallbacks_used=0,
    available=CHILDREN,
    mode="same_try",
    max_fallbacks=2,
):
    return decide_fallback(
        TIMEOUT,
        failed_on=tried[-1] if tried else "lambda",
        fallback=fallback,
        tried=tried,
        fallbacks_used=fallbacks_used,
        available=available,
        mode=mode,
        max_fallbacks=max_fallbacks,
    )


# -- same_try ----------------------------------------------------------------------------------------------------


def test_same_try_goes_to_the_fallback_executors_in_policy_order():
    assert decide() == RerunSameTry(("ecs", "local"))


def test_executors_already_tried_for_this_try_are_skipped():
    # The try ran on lambda, then on ecs (its first fallback), which died too.
    assert decide(tried=("lambda", "ecs"), fallbacks_used=1) == RerunSameTry(("local",))


def test_the_executor_that_failed_is_skipped_even_when_listed_as_a_fallback():
    assert decide(fallback=("lambda", "local")) == RerunSameTry(("local",))


def test_fallback_executors_the_router_has_no_child_for_are_skipped():
    assert decide(available=("lambda", "local")) == RerunSameTry(("local",))


@pytest.mark.parametrize(
    "case",
    [
        {"fallback": ()},  # no fallback list
        {"fallback": ("ecs", "local"), "tried": ("lambda", "ecs", "local"), "fallbacks_used": 1},  # all tried
        {"fallback": ("ecs",), "available": ("lambda",)},  # listed, but no such child
    ],
    ids=["no-fallback-list", "all-tried", "no-such-child"],
)
def test_no_fallback_left_exhausts_the_try(case):
    assert decide(**case) == FallbacksExhausted(ExhaustedCause.NO_FALLBACK_LEFT, max_fallbacks=2)


@pytest.mark.parametrize(("fallbacks_used", "max_fallbacks"), [(2, 2), (3, 2), (0, 0)])
def test_max_fallbacks_reached_exhausts_the_try(fallbacks_used, max_fallbacks):
    assert decide(fallbacks_used=fallbacks_used, max_fallbacks=max_fallbacks) == FallbacksExhausted(
        ExhaustedCause.MAX_FALLBACKS_REACHED, max_fallbacks=max_fallbacks
    )


def test_one_fallback_below_the_bound_still_runs():
    assert decide(fallbacks_used=1, max_fallbacks=2) == RerunSameTry(("ecs", "local"))


def test_no_fallback_left_is_the_reason_given_when_both_hold():
    exhausted = decide(fallback=(), fallbacks_used=2, max_fallbacks=2)
    assert exhausted == FallbacksExhausted(ExhaustedCause.NO_FALLBACK_LEFT, max_fallbacks=2)


# -- next_try ----------------------------------------------------------------------------------------------------


def test_next_try_routes_the_next_try_to_the_first_fallback_left():
    assert decide(mode="next_try", tried=("lambda",)) == RouteNextTry(
        NextTryRoute("ecs", ("local",), failed_on="lambda", reason="timeout")
    )


def test_next_try_skips_tried_and_unknown_executors_too():
    route = decide(mode="next_try", fallback=("lambda", "gone", "local"), tried=("lambda",))
    assert route == RouteNextTry(NextTryRoute("local", (), failed_on="lambda", reason="timeout"))


def test_next_try_is_not_bounded_by_max_fallbacks():
    # Each next-try fallback spends one of the task's retries, which Airflow bounds.
    assert isinstance(decide(mode="next_try", fallbacks_used=5, max_fallbacks=0), RouteNextTry)


def test_next_try_with_no_fallback_left_does_nothing():
    assert decide(mode="next_try", fallback=()) == NothingToDo()


# -- what people are told about an exhausted try -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("exhausted", "why"),
    [
        (FallbacksExhausted(ExhaustedCause.NO_FALLBACK_LEFT, 2), "no fallback executor left"),
        (FallbacksExhausted(ExhaustedCause.MAX_FALLBACKS_REACHED, 2), "max_fallbacks (2) reached"),
    ],
)
def test_an_exhausted_try_says_why(exhausted, why):
    notice = audit.fallback_exhausted("lambda", TIMEOUT, exhausted)
    assert notice.event == audit.EVENT_FALLBACK_EXHAUSTED and notice.level == "error"
    assert notice.extra == {"failed_on": "lambda", "reason": "timeout", "why": why}
    assert notice.message == (
        "hybrid_router: the run on executor 'lambda' died (timeout: Task timed out after 900.00 seconds); "
        f"{why}, so the try fails"
    )
