"""Building child executors from policy entries, and what counts as a free slot."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from airflow.executors.local_executor import LocalExecutor
from router_fakes import CapacityChild, FakeChild

from devtools.workloads import make_workload
from hybrid_router.child_protocol import FunctionLimits
from hybrid_router.router.children import Child, ChildConfigError, build_children, instantiate_child


class WithOptions(FakeChild):
    def __init__(self, function_name: str, *args, region: str = "us-east-1", **kwargs):
        super().__init__(*args, **kwargs)
        self.function_name = function_name
        self.region = region


def test_short_name_resolves_through_airflows_executor_loader_with_parallelism_from_max_concurrency():
    child = instantiate_child("local", "LocalExecutor", max_concurrency=3, options={})
    assert type(child) is LocalExecutor
    assert child.parallelism == 3
    assert child.name.alias == "local"
    assert child.name.module_path == "airflow.executors.local_executor.LocalExecutor"


def test_options_become_constructor_keywords():
    child = instantiate_child(
        "lam", f"{__name__}.WithOptions", max_concurrency=7, options={"function_name": "f", "region": "eu"}
    )
    assert (child.function_name, child.region, child.parallelism) == ("f", "eu", 7)


class Strict(FakeChild):
    def __init__(self, parallelism: int = 4, team_name: str | None = None, label: str = "x"):
        super().__init__(parallelism=parallelism, team_name=team_name, label=label)


def test_an_option_the_class_does_not_name_is_refused_before_construction():
    with pytest.raises(ChildConfigError, match=r"executors\.s\.options: Strict does not accept funtion"):
        instantiate_child("s", f"{__name__}.Strict", max_concurrency=None, options={"funtion": "x"})


def test_an_option_behind_kwargs_fails_at_construction_naming_the_entry():
    with pytest.raises(ChildConfigError, match=r"executors\.local: LocalExecutor\(.*funtion"):
        instantiate_child("local", "LocalExecutor", max_concurrency=None, options={"funtion": "x"})


def test_options_kept_by_kwargs_reach_the_lambda_executor():
    child = instantiate_child(
        "lambda",
        "hybrid_router.lambda_exec.LambdaExecutor",
        max_concurrency=5,
        options={"function_name": "f"},
    )
    assert child.parallelism == 5
    assert child._options == {"function_name": "f"}


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        ("LocalExecuter", r"executors\.x\.class: 'LocalExecuter' is neither an Airflow executor short name"),
        ("no.such.module.Executor", r"executors\.x\.class: cannot import 'no\.such\.module\.Executor'"),
        ("collections.OrderedDict", r"executors\.x\.class: 'collections\.OrderedDict' is not a subclass"),
    ],
)
def test_a_bad_class_names_the_entry(class_path, message):
    with pytest.raises(ChildConfigError, match=message):
        instantiate_child("x", class_path, max_concurrency=None, options={})


def test_build_children_keeps_policy_order():
    specs = {
        "b": SimpleNamespace(class_path="LocalExecutor", max_concurrency=2, options={}),
        "a": SimpleNamespace(
            class_path=f"{__name__}.WithOptions", max_concurrency=None, options={"function_name": "f"}
        ),
    }
    children = build_children(specs)
    assert list(children) == ["b", "a"]
    assert children["b"].limit == 2
    # No max_concurrency: the child's own parallelism is the bound.
    assert children["a"].limit == children["a"].executor.parallelism


def test_free_slots_is_the_tightest_bound():
    executor = CapacityChild(parallelism=10, capacity=4)
    child = Child("lam", executor, max_concurrency=3)
    assert child.free_slots() == 3
    child.in_flight.add(make_workload("t").ti.key)
    assert child.free_slots() == 2
    executor.capacity = 1  # throttled, or reserved concurrency nearly used
    assert child.free_slots() == 1
    executor.capacity = 0
    assert child.free_slots() == 0
    executor.queue_workload(make_workload("u"), session=None)
    executor.capacity = 100
    assert child.free_slots() == 2  # max_concurrency 3 - 1 in flight; the child's own slots are 9


def test_a_failing_free_capacity_counts_as_full():
    class Broken(CapacityChild):
        def free_capacity(self):
            raise RuntimeError("boom")

    assert Child("x", Broken(parallelism=5)).free_slots() == 0


def test_a_child_that_cannot_start_is_unavailable_and_logs_without_its_option_values(caplog, counters):
    from hybrid_router.router.children import START_RETRY_FIRST_S, START_RETRY_MAX_S

    spec = SimpleNamespace(
        class_path="router_fakes.UnstartableChild",
        max_concurrency=2,
        options={"failures": 2, "secret": "TOPSECRET-hmac-key"},
    )
    child = build_children({"lam": spec})["lam"]

    assert child.start(now=100.0) is False  # never raises
    assert not child.available and child.free_slots() == 0 and child.prefetch_slots() == 0
    assert child.start_failure.error.startswith("ClientError: An error occurred (ExpiredTokenException)")
    assert "TOPSECRET" not in caplog.text and "token of *** expired" in caplog.text
    child.retry_start(now=100.0 + START_RETRY_FIRST_S * 0.79)  # the back-off (jitter takes at most a fifth)
    assert child.executor.start_calls == 1
    child.retry_start(now=100.0 + START_RETRY_FIRST_S)
    assert child.executor.start_calls == 2 and child.start_failure.attempts == 2
    assert child.start_failure.since == 100.0
    child.retry_start(now=100.0 + START_RETRY_FIRST_S + START_RETRY_MAX_S)
    assert child.available and child.free_slots() == 2
    assert counters == ["hybrid_router.child_start_failed.lam"] * 2
    assert [r.levelname for r in caplog.records if "lam" in r.getMessage()] == ["ERROR", "WARNING"]


def test_start_retries_back_off_exponentially_with_jitter_up_to_a_bound():
    from hybrid_router.router.children import START_RETRY_FIRST_S, START_RETRY_MAX_S, start_retry_delay

    assert [start_retry_delay(n, rand=lambda: 0.0) for n in (1, 2, 3)] == [
        START_RETRY_FIRST_S,
        2 * START_RETRY_FIRST_S,
        4 * START_RETRY_FIRST_S,
    ]
    assert start_retry_delay(50, rand=lambda: 0.0) == START_RETRY_MAX_S
    assert start_retry_delay(50, rand=lambda: 1.0) == START_RETRY_MAX_S * 0.8


class SizedFunction(FakeChild):
    """A child that learns at start what its function allows, as the LambdaExecutor does."""

    def start(self):
        super().start()
        self.function_limits = FunctionLimits(memory_mb=1024, timeout_s=60)


@pytest.mark.parametrize(
    ("memory_mb", "duration_s", "warnings"),
    [
        (1024, 60.0, []),
        (2048, 60.0, ["limits.max_memory_mb is 2048 MB but its function's memory size is 1024 MB: tasks the "
                      "policy sends there may run out of memory"]),
        (1024, None, ["limits.max_duration is not set but its function's timeout is 60 s: tasks the policy "
                      "sends there may time out"]),
        (512, 30.0, ["limits.max_memory_mb is 512 MB but its function's memory size is 1024 MB: tasks that "
                     "would fit it are sent elsewhere",
                     "limits.max_duration is 30 s but its function's timeout is 60 s: tasks that would fit it "
                     "are sent elsewhere"]),
    ],
)  # fmt: skip
def test_a_started_child_whose_function_allows_other_limits_than_the_policys_is_warned_about(
    caplog, memory_mb, duration_s, warnings
):
    spec = SimpleNamespace(
        class_path=f"{__name__}.SizedFunction",
        max_concurrency=2,
        options={},
        limits=SimpleNamespace(max_memory_mb=memory_mb, max_duration_s=duration_s),
    )
    child = build_children({"lam": spec})["lam"]
    caplog.set_level("WARNING", logger="hybrid_router.router.children")
    assert child.start(now=0.0)
    said = [r.getMessage() for r in caplog.records if r.name == "hybrid_router.router.children"]
    assert len(said) == len(warnings), said
    for line, expected in zip(said, warnings, strict=True):
        assert line.startswith(f"Executor lam: the policy's {expected}. The router routes by"), line


def test_a_child_that_does_not_know_its_functions_limits_is_not_warned_about(caplog):
    spec = SimpleNamespace(
        class_path="router_fakes.FakeChild", max_concurrency=2, options={}, limits=SimpleNamespace(
            max_memory_mb=None, max_duration_s=None)
    )  # fmt: skip
    assert build_children({"x": spec})["x"].start(now=0.0)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
