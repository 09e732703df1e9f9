"""``simulate`` priced and compared, its offline HTML report, expected fallbacks, start latencies, and ``recommend``
on a task table; the metadata-database paths are in test_simulate_from_db.py."""

from __future__ import annotations

import json
import textwrap
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser

import pytest

from hybrid_router.router.cli import EXIT_OK, main
from hybrid_router.router.cost_model import expected_deaths
from hybrid_router.router.measured_runs import FinishedRun
from hybrid_router.router.policy import ExecutorSpec, Limits, load_policy, load_policy_text
from hybrid_router.router.pricing import price_table
from hybrid_router.router.start_latency import MEASURED, StartLatencies, start_latencies_of

from .cli_runner import REPO_ROOT

EXAMPLE_POLICY = REPO_ROOT / "examples" / "policy.yaml"
ECS_POLICY = REPO_ROOT / "examples" / "policy-ecs.yaml"
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
TASKS = "dag_id,task_id,duration,memory_mb,count\nd,quick,30s,400,100\nd,slow,40m,2048,4\n"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def tasks(tmp_path):
    path = tmp_path / "tasks.csv"
    path.write_text(TASKS)
    return path


def test_compare_json_gives_one_object_per_policy_with_the_figures_recomputed(capsys, tasks):
    code, out, err = run(
        capsys, "simulate", "--policy", str(EXAMPLE_POLICY), "--compare", str(ECS_POLICY), "--tasks", str(tasks),
        "--json",
    )  # fmt: skip
    assert code == EXIT_OK, err
    local_first, ecs_first = json.loads(out)
    for report, path in ((local_first, EXAMPLE_POLICY), (ecs_first, ECS_POLICY)):
        assert report["policy"] == str(path)
        assert {"cost_usd", "task_hours", "start_latency_s", "fallbacks"} <= report.keys()
        assert report["task_hours"] == pytest.approx((100 * 30 + 4 * 2400) / 3600, abs=1e-3)
        assert report["fallbacks"] == 0  # a task table has no measured failures
    # quick goes to Lambda in both, a function of limits.max_memory_mb: the example's smallest that holds it
    # (512 MB), the ECS policy's 10,240 MB; slow to local (free, unpriced) or ECS
    assert local_first["cost_usd"] == pytest.approx(100 * (0.0000002 + 30 * 0.5 * 0.0000166667), rel=1e-4)
    big_lambda = 100 * (0.0000002 + 30 * 10 * 0.0000166667)
    fargate = 4 * 2400 * (0.04048 + 2 * 0.004445) / 3600
    assert ecs_first["cost_usd"] == pytest.approx(big_lambda + fargate, rel=1e-4)
    # no start was measured: Lambda 1 s, LocalExecutor 0.5 s, ECS 60 s, each said to be assumed
    assert local_first["start_latency_s"] == pytest.approx(100 * 1.0 + 4 * 0.5)
    assert ecs_first["start_latency_s"] == pytest.approx(100 * 1.0 + 4 * 60.0)
    assert any(note.startswith("ecs: fargate") and "assumed" in note for note in ecs_first["notes"])
    assert any(
        note.startswith("local: slot") and "no slot price given" in note for note in local_first["notes"]
    )


def test_compare_text_sets_the_policies_side_by_side(capsys, tasks):
    code, out, _ = run(
        capsys,
        "simulate",
        "--policy",
        str(EXAMPLE_POLICY),
        "--compare",
        str(ECS_POLICY),
        "--tasks",
        str(tasks),
    )
    assert code == EXIT_OK
    lines = out.splitlines()
    assert (
        lines[0]
        == f"Compared on 104 task runs (2 rows, {tasks}); AWS list prices for us-east-1 taken "
        + (lines[0].rsplit(" ", 1)[1])
    )
    header = lines[2].split()
    assert header == [str(EXAMPLE_POLICY), str(ECS_POLICY)]
    rows = {line[:15].strip(): line[15:].split() for line in lines[3:9]}
    assert set(rows) == {"tasks", "task-hours", "cost $", "start latency", "fallbacks", "failed tries"}
    assert rows["tasks"] == ["104", "104"]
    assert rows["start latency"] == ["1m42s", "5m40s"]


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_the_html_report_draws_its_charts_inline_and_fetches_nothing(capsys, tasks, tmp_path):
    report = tmp_path / "out" / "report.html"
    report.parent.mkdir()
    code, out, err = run(
        capsys, "simulate", "--policy", str(EXAMPLE_POLICY), "--compare", str(ECS_POLICY), "--tasks", str(tasks),
        "--html", str(report), "--json",
    )  # fmt: skip
    assert code == EXIT_OK, err
    assert err.strip() == f"wrote {report}"
    figures = json.loads(out)  # stdout stays one JSON document
    parser = Tags()
    parser.feed(report.read_text(encoding="utf-8"))

    names = [tag for tag, _ in parser.tags]
    assert "script" not in names and "link" not in names and "img" not in names and "iframe" not in names
    for tag, attrs in parser.tags:
        for key, value in attrs.items():
            assert not (key in ("src", "href", "xlink:href", "srcset") and value), (tag, key, value)
            assert "url(" not in (value or ""), (tag, key, value)
    style = "".join(parser.text)
    assert "@import" not in style and "url(" not in style

    charts = {attrs["data-metric"]: [] for tag, attrs in parser.tags if tag == "svg"}
    assert set(charts) == {"cost_usd", "task_hours", "start_latency_s", "fallbacks"}
    current = None
    for tag, attrs in parser.tags:
        if tag == "svg":
            current = attrs["data-metric"]
        elif tag == "rect" and "data-value" in attrs:
            charts[current].append(attrs)
    # one stacked bar per policy: its segments add up to the figure the JSON gives
    for metric in ("cost_usd", "task_hours", "start_latency_s"):
        for policy in figures:
            executors = policy["executors"]
            segments = [float(rect["data-value"]) for rect in charts[metric]][: len(executors)]
            charts[metric] = charts[metric][len(executors) :]
            assert sum(segments) == pytest.approx(policy[metric], rel=1e-4, abs=1e-6)
    text = " ".join(parser.text)
    for policy in figures:
        assert policy["policy"] in text
    assert f"${figures[1]['cost_usd']:,.4f}" in text


def finished(
    executor: str, outcome: str, peak: int | None = None, size: int | None = 512, ms: int | None = 1000
):
    return FinishedRun("d", "t", T0, executor, outcome, size, peak, ms, None)


@pytest.mark.parametrize(
    ("runs", "executor", "memory", "max_duration", "expected"),
    [
        # a run that peaked above the executor's size dies there; one below it does not
        ([finished("lambda", "success", 700), finished("lambda", "success", 300)], "big", 512, None,
         {"out_of_memory": 0.5}),
        # out of memory on 512 MB: dies on anything no bigger, lives on a bigger function or one without a size
        ([finished("lambda", "out_of_memory", 512)], "lambda", 512, None, {"out_of_memory": 1.0}),
        ([finished("lambda", "out_of_memory", 512)], "lambda_1g", 1024, None, {}),
        ([finished("lambda", "out_of_memory", 512)], "local", None, None, {}),
        # ran 20 minutes: times out under 15
        ([finished("local", "success", ms=1_200_000)], "lambda", None, 900.0, {"timeout": 1.0}),
        # timed out after 15 s on lambda: again there, whatever max_duration says; not on a longer executor
        ([finished("lambda", "timeout", ms=15_000), finished("lambda", "success", ms=1_000)], "lambda", None,
         900.0, {"timeout": 0.5}),
        ([finished("lambda", "timeout", ms=15_000)], "lambda_long", None, 900.0, {}),
        ([finished("lambda", "timeout", ms=15_000)], "short", None, 10.0, {"timeout": 1.0}),
        # a crash belongs to the executor it happened on
        ([finished("lambda", "runtime_crash"), finished("lambda", "success")], "lambda", None, None,
         {"runtime_crash": 0.5}),
        ([finished("lambda", "runtime_crash")], "local", None, None, {}),
    ],
)  # fmt: skip
def test_expected_deaths_replay_the_measured_runs(runs, executor, memory, max_duration, expected):
    spec = ExecutorSpec(
        name=executor,
        class_path="LocalExecutor",
        limits=Limits(max_duration_s=max_duration, max_memory_mb=memory),
    )
    billing = price_table().billing(spec)
    assert expected_deaths(runs, spec, billing, {executor: spec}) == pytest.approx(expected)


def test_start_latency_pairs_a_start_with_the_last_hand_over_before_it():
    def row(run_id, at, executor, start):
        return ("d", "t", run_id, -1, 1, T0 + timedelta(seconds=at), json.dumps({"executor": executor}),
                T0 + timedelta(seconds=start))  # fmt: skip

    latencies = start_latencies_of(
        [
            row("a", 0, "lambda", 2),
            # a fallback: the run on local started 1 s after its hand-over; the dead run's start is not known
            row("b", 0, "lambda", 31),
            row("b", 30, "local", 31),
            # resumed after deferral: a later hand-over, and the first start kept
            row("c", 0, "lambda", 1),
            row("c", 600, "lambda", 1),
            # the worker's clock a second behind the scheduler's
            row("e", 10, "lambda", 9.5),
        ]
    )
    assert latencies.measured == {"lambda": (2.0, 1.0, 0.0), "local": (1.0,)}
    local = ExecutorSpec(name="local", class_path="LocalExecutor")
    assert latencies.of(local).source == MEASURED
    assert StartLatencies().of(local).seconds == 0.5


# One Lambda function, far bigger than the short tasks it takes need.
OVERSIZED_LAMBDA_POLICY = """
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    limits: {max_duration: 15m, max_memory_mb: 10240}
    options: {function_name: hybrid-router-demo}
  local: {class: LocalExecutor, max_concurrency: 8}
defaults: {expected_duration: 2m, memory_mb: 512, run_on: local}
rules:
  - name: short and small
    if: {expected_duration: "< 12m", memory_mb: "<= 3008"}
    run_on: lambda
    overflow: [local]
    fallback: [local]
  - name: everything else
    run_on: local
"""


def test_recommend_from_a_task_table_gives_a_policy_that_loads(capsys, tasks, tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text("executors:\n  local: {slot_hour_usd: 0.05}\n")
    oversized = tmp_path / "policy.yaml"
    oversized.write_text(textwrap.dedent(OVERSIZED_LAMBDA_POLICY))
    code, out, err = run(
        capsys, "recommend", "--policy", str(oversized), "--tasks", str(tasks), "--prices", str(prices)
    )
    assert code == EXIT_OK, err
    policy = load_policy_text(out, "proposal.yaml")
    # quick (30 s, 400 MB x 1.2): the 512 MB function instead of the 10,240 MB one
    first = policy.rules[0]
    assert (first.name, first.run_on, first.fallback) == (
        "recommended: d.quick",
        ("lambda_512mb",),
        ("local",),
    )
    assert policy.executors["lambda_512mb"].limits.max_memory_mb == 512
    assert policy.executors["lambda_512mb"].options == {"function_name": "hybrid-router-demo-512mb"}
    # slow (40 m) fits no Lambda function and already runs on local: no rule for it
    assert [rule.name for rule in policy.rules[1:]] == [rule.name for rule in load_policy(oversized).rules]
    assert "1 of 2 tasks move" in out


def test_recommend_leaves_tasks_on_an_unpriced_executor_where_they_are(capsys, tmp_path):
    tasks = tmp_path / "tasks.csv"
    tasks.write_text("dag_id,task_id,duration,memory_mb,count\nd,small,5s,100,10\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            """\
            version: 1
            executors:
              lambda: {class: hybrid_router.lambda_exec.LambdaExecutor, limits: {max_duration: 15m, max_memory_mb: 512}}
              local: {class: LocalExecutor}
            defaults: {run_on: local}
            rules:
              - {name: everything, run_on: local}
            """
        )
    )
    code, out, _ = run(capsys, "recommend", "--policy", str(policy), "--tasks", str(tasks), "--json")
    assert code == EXIT_OK
    result = json.loads(out)
    assert result["tasks"][0]["proposed"] == "local"
    assert "its tasks stay there" in result["proposal"].replace("\n# ", " ")  # comments wrap
    assert load_policy_text(result["proposal"]).rules[0].name == "everything"
