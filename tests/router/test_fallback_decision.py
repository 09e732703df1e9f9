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


# -- fallback lists by reason ------------------------------------------------------------------------------------

OUT_OF_MEMORY = InfrastructureFailure(
    reason="out_of_memory", detail="Runtime exited with error: signal: killed"
)
BY_REASON = {"out_of_memory": ("lambda_3g", "local"), "timeout": ("local",), "default": ("ecs",)}
SIZED_CHILDREN = ("lambda", "lambda_3g", "ecs", "local")


def decide_for(failure, fallback=BY_REASON, mode="same_try"):
    return decide_fallback(
        failure,
        failed_on="lambda",
        fallback=fallback,
        tried=("lambda",),
        fallbacks_used=0,
        available=SIZED_CHILDREN,
        mode=mode,
        max_fallbacks=2,
    )


@pytest.mark.parametrize(
    ("failure", "candidates"),
    [
        (OUT_OF_MEMORY, ("lambda_3g", "local")),  # the same try runs on the bigger function
        (TIMEOUT, ("local",)),
        (InfrastructureFailure(reason="runtime_crash"), ("ecs",)),  # any other reason: default
    ],
)
def test_the_list_for_the_failure_reason_is_used(failure, candidates):
    assert decide_for(failure) == RerunSameTry(candidates)


def test_a_reason_in_a_group_uses_the_group_list():
    fallback = {"never_started": ("lambda_3g",), "default": ("local",)}
    assert decide_for(InfrastructureFailure(reason="throttled"), fallback) == RerunSameTry(("lambda_3g",))


def test_a_reason_with_no_list_and_no_default_exhausts_the_try():
    exhausted = decide_for(TIMEOUT, {"out_of_memory": ("lambda_3g",)})
    assert exhausted == FallbacksExhausted(ExhaustedCause.NO_FALLBACK_LEFT, max_fallbacks=2)


def test_next_try_routes_by_reason_too():
    assert decide_for(OUT_OF_MEMORY, mode="next_try") == RouteNextTry(
        NextTryRoute("lambda_3g", ("local",), failed_on="lambda", reason="out_of_memory")
    )


def test_a_decisions_lists_feed_decide_fallback():
    from hybrid_router.router.policy import Decision

    decision = Decision(
        "lambda",
        (),
        ("local",),
        "r",
        0,
        (),
        300.0,
        "policy_default",
        512,
        "policy_default",
        fallback_by_reason=(("out_of_memory", ("lambda_3g", "local")),),
    )
    assert decision.fallback_lists() == {"out_of_memory": ("lambda_3g", "local"), "default": ("local",)}
    assert decide_for(OUT_OF_MEMORY, decision.fallback_lists()) == RerunSameTry(("lambda_3g", "local"))
    assert decide_for(TIMEOUT, decision.fallback_lists()) == RerunSameTry(("local",))
