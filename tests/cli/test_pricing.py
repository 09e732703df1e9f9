"""The price table: the packaged AWS list prices, a policy's ``pricing`` section and ``--prices FILE`` over them,
what a run costs on each kind of executor, and every mistake reported as file:line:col."""

from __future__ import annotations

import re
import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_router.policies import PRICES
from hybrid_router.router.cli import EXIT_INVALID, main
from hybrid_router.router.policy import ExecutorSpec, Limits, PolicyError, load_policy_text
from hybrid_router.router.policy.prices import load_prices, load_prices_text
from hybrid_router.router.pricing import FARGATE, LAMBDA, SLOT, billing_kind, price_table

from .cli_runner import REPO_ROOT

EXAMPLE_POLICY = REPO_ROOT / "examples" / "policy.yaml"
ISSUE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<path>\S+): (?P<message>.+)$")

POLICY = textwrap.dedent(
    """\
    version: 1
    executors:
      lambda:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m, max_memory_mb: 1024}
      ecs: {class: airflow.providers.amazon.aws.executors.ecs.ecs_executor.AwsEcsExecutor}
      local: {class: LocalExecutor}
    defaults: {run_on: local}
    rules:
      - {name: short, if: {expected_duration: "< 12m"}, run_on: lambda, fallback: [ecs]}
    """
)


def spec(name: str, class_path: str, **limits) -> ExecutorSpec:
    return ExecutorSpec(name=name, class_path=class_path, limits=Limits(**limits))


def test_the_packaged_table_names_its_region_date_and_sources():
    raw = yaml.safe_load(PRICES.read_text())
    table = load_prices(PRICES)
    assert (table["region"], table["taken"]) == ("us-east-1", raw["taken"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", table["taken"])
    assert any("aws.amazon.com/lambda/pricing" in source for source in table["sources"])
    assert any("aws.amazon.com/fargate/pricing" in source for source in table["sources"])
    # arm64 is cheaper than x86 for both, as AWS prices it
    for kind, key in (("lambda", "gb_second_usd"), ("fargate", "vcpu_hour_usd")):
        assert table[kind]["arm64"][key] < table[kind]["x86_64"][key]
    assert table["fargate"]["minimum_billed_s"] == 60
    assert table["slot_hour_usd"] == 0


def test_what_a_run_costs_on_each_kind_of_executor():
    prices = price_table()
    lam = prices.billing(spec("lambda", "hybrid_router.lambda_exec.LambdaExecutor", max_memory_mb=2048))
    assert lam.kind == LAMBDA and lam.memory_mb == 2048
    assert lam.run_cost(10) == pytest.approx(0.0000002 + 10 * 2 * 0.0000166667)
    assert lam.run_cost(10, runs=3) == pytest.approx(3 * lam.run_cost(10))

    ecs = prices.billing(
        spec("ecs", "airflow.providers.amazon.aws.executors.ecs.ecs_executor.AwsEcsExecutor")
    )
    assert ecs.kind == FARGATE
    hourly = 1 * 0.04048 + 2 * 0.004445  # the assumed 1 vCPU / 2 GB task
    assert ecs.run_cost(20) == pytest.approx(60 * hourly / 3600)  # one-minute minimum
    assert ecs.run_cost(600) == pytest.approx(600 * hourly / 3600)
    assert ecs.assumed  # the task size was not given

    local = prices.billing(spec("local", "LocalExecutor"))
    assert local.kind == SLOT and local.run_cost(3600) == 0
    assert not local.priced and "slot_hour_usd" in local.assumed[0]


def test_policy_section_and_price_file_override_in_that_order(tmp_path):
    text = POLICY + textwrap.dedent(
        """\
        pricing:
          slot_hour_usd: 0.2
          executors:
            lambda: {architecture: arm64}
            ecs: {vcpu: 2, memory_mb: 4GB, architecture: arm64}
        """
    )
    policy = load_policy_text(text, "p.yaml")
    file_table = load_prices_text(
        "slot_hour_usd: 0.5\nlambda:\n  arm64: {gb_second_usd: 0.00001}\n", "f.yaml"
    )
    prices = price_table(policy.pricing, file_table)
    lam = prices.billing(policy.executors["lambda"])
    assert lam.run_cost(1) == pytest.approx(
        0.0000002 + 1 * 0.00001
    )  # the file's arm64 price, the table's request
    ecs = prices.billing(policy.executors["ecs"])
    assert ecs.run_cost(3600) == pytest.approx(2 * 0.03238 + 4 * 0.00356) and not ecs.assumed
    assert prices.billing(policy.executors["local"]).run_cost(3600) == pytest.approx(0.5)
    assert price_table(policy.pricing).billing(policy.executors["local"]).run_cost(3600) == pytest.approx(0.2)


def test_billing_kind_comes_from_the_class_and_ecs_launch_type():
    assert (
        billing_kind(spec("a", "airflow.providers.amazon.aws.executors.aws_lambda.AwsLambdaExecutor"))
        == LAMBDA
    )
    assert billing_kind(spec("b", "airflow.providers.amazon.aws.executors.batch.AwsBatchExecutor")) == FARGATE
    assert billing_kind(spec("c", "CeleryExecutor")) == SLOT
    on_ec2 = ExecutorSpec(
        name="d",
        class_path="airflow.providers.amazon.aws.executors.ecs.ecs_executor.AwsEcsExecutor",
        options={"launch_type": "EC2"},
    )
    assert billing_kind(on_ec2) == SLOT


def test_mistakes_in_the_policy_section_are_reported_with_their_place():
    text = POLICY + textwrap.dedent(
        """\
        pricing:
          slot_hour_usd: .nan
          lambda:
            x86_64: {gb_second_usd: -1}
          executors:
            lamda: {architecture: arm64}
            ecs: {vcpu: 64, memory_mb: lots, billing: spot}
        """
    )
    with pytest.raises(PolicyError) as raised:
        load_policy_text(text, "p.yaml")
    located = [str(issue) for issue in raised.value.issues]
    assert located == [
        "p.yaml:12:18: pricing.slot_hour_usd: must be a finite number of dollars >= 0, got nan",
        "p.yaml:14:29: pricing.lambda.x86_64.gb_second_usd: must be at least 0, got integer -1",
        "p.yaml:16:5: pricing.executors.lamda: unknown executor 'lamda' (did you mean 'lambda'?)",
        "p.yaml:17:17: pricing.executors.ecs.vcpu: must be at most 16, got integer 64",
        "p.yaml:17:32: pricing.executors.ecs.memory_mb: invalid memory size 'lots': expected '512' or 512 (MB),"
        " '512MB', '3GB', '2GiB'",
        "p.yaml:17:47: pricing.executors.ecs.billing: string 'spot' is not one of 'lambda', 'fargate', 'slot'"
        " (did you mean 'slot'?)",
    ]


def test_a_bad_price_file_exits_1_with_every_problem_located(capsys, tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text("fargate:\n  minimum_billed: 1 fortnight\n  x86: {vcpu_hour_usd: 1}\nslot_hour: 1\n")
    code = main(["simulate", "--policy", str(EXAMPLE_POLICY), "--tasks", str(REPO_ROOT / "examples" / "tasks.csv"),
                 "--prices", str(prices)])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert code == EXIT_INVALID
    located = [ISSUE.match(line).group("file", "line", "col", "path") for line in err[:-1]]
    assert located == [
        (str(prices), "2", "19", "fargate.minimum_billed"),
        (str(prices), "3", "3", "fargate.x86"),
        (str(prices), "4", "1", "slot_hour"),
    ]
    assert "did you mean 'x86_64'" in err[1] and "did you mean 'slot_hour_usd'" in err[2]
    assert err[-1] == f"{prices}: invalid price table"


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "1GB", "lots", "1m", "arm64", "x86_64", "lambda", "fargate", "slot", "spot"]),
    st.lists(st.integers(0, 3), max_size=2),
)
_ENTRY = st.dictionaries(
    st.sampled_from(["billing", "architecture", "memory_mb", "vcpu", "slot_hour_usd", "bogus"]),
    _VALUES,
    max_size=4,
)
_PRICES = st.dictionaries(
    st.sampled_from(["gb_second_usd", "request_usd", "vcpu_hour_usd", "gb_hour_usd"]), _VALUES
)
_PRICING = st.fixed_dictionaries(
    {},
    optional={
        "region": _VALUES,
        "taken": _VALUES,
        "slot_hour_usd": _VALUES,
        "lambda": st.dictionaries(st.sampled_from(["x86_64", "arm64", "arm"]), st.one_of(_PRICES, _VALUES)),
        "fargate": st.dictionaries(
            st.sampled_from(["x86_64", "arm64", "minimum_billed"]), st.one_of(_PRICES, _VALUES), max_size=3
        ),
        "executors": st.one_of(
            _VALUES, st.dictionaries(st.sampled_from(["lambda", "ecs", "local", "nope", "1bad"]), _ENTRY)
        ),
    },
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(_PRICING, _VALUES))
def test_fuzzed_pricing_sections_load_or_fail_with_located_issues(pricing):
    text = POLICY + yaml.safe_dump({"pricing": pricing}, sort_keys=False)
    try:
        policy = load_policy_text(text, "fuzz.yaml")
    except PolicyError as error:
        assert error.issues and all(issue.file == "fuzz.yaml" and issue.line >= 1 for issue in error.issues)
        return
    prices = price_table(policy.pricing)
    for spec in policy.executors.values():
        assert prices.billing(spec).run_cost(90) >= 0
