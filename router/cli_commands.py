"""Bodies of the ``hybrid-router`` commands (definitions in ``cli.py``), imported only when a command runs.

Each body prints its result and ends with ``SystemExit`` for a non-zero exit code, because Airflow's CLI
ignores a command's return value. Exit codes: 0 ok, 1 invalid policy or input, 2 usage.
Airflow's configuration is touched only when a command needs it (no ``--policy``, a history lookup,
``--from-db``), so ``validate`` and ``explain --policy F --expected-duration D`` run without a configured
Airflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn

from hybrid_router.router.cli import EXIT_INVALID, EXIT_USAGE
from hybrid_router.router.policy import (
    Decision,
    MemoryLookup,
    Policy,
    PolicyError,
    TaskFacts,
    load_policy,
    resolve_facts,
)
from hybrid_router.router.policy.units import format_duration, format_memory

if TYPE_CHECKING:
    from hybrid_router.router.config import RouterConfig
    from hybrid_router.router.cost_model import MeasuredHistory
    from hybrid_router.router.history import TaskKey, TaskRunStats
    from hybrid_router.router.recommend import TaskNeed
    from hybrid_router.router.simulate import SimulationReport

COMMAND_LINE_SOURCE = "command_line"


def _fail(code: int, *messages: str) -> NoReturn:
    for message in messages:
        print(message, file=sys.stderr)
    raise SystemExit(code)


def _router_config() -> RouterConfig:
    from hybrid_router.router.config import RouterConfig, RouterConfigError

    try:
        return RouterConfig.from_airflow_conf()
    except (RouterConfigError, ValueError) as error:  # AirflowConfigException is a ValueError too
        _fail(EXIT_INVALID, f"error: {error}")


def _load_policy(path: str | None) -> tuple[Policy, str]:
    """The policy named on the command line, else the configured one; exits 1 when it does not load."""
    if path is None:
        path = str(_router_config().policy_file)
    try:
        return load_policy(path), path
    except PolicyError as error:
        _fail(EXIT_INVALID, *(str(issue) for issue in error.issues), f"{path}: invalid policy")


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, sort_keys=False, default=str))


# validate ----------------------------------------------------------------------------------------------


def validate(args: argparse.Namespace) -> None:
    """Check each file; list every error (and warning) as ``file:line:col: path: message``."""
    invalid = 0
    for path in args.files:
        try:
            policy = load_policy(path)
        except PolicyError as error:
            invalid += 1
            for issue in error.issues:
                print(issue)
            for issue in error.warnings:
                print(f"{issue} (warning)")
            print(f"{path}: invalid, {len(error.issues)} error(s), {len(error.warnings)} warning(s)")
            continue
        for issue in policy.warnings:
            print(f"{issue} (warning)")
        print(f"{path}: valid, {len(policy.rules)} rule(s), {len(policy.warnings)} warning(s)")
    if invalid:
        raise SystemExit(EXIT_INVALID)


# explain -----------------------------------------------------------------------------------------------


def _history_lookup(dag_id: str, task_id: str) -> tuple[Callable[[str, str], float | None] | None, list[str]]:
    """The metadata database's duration history, and notes for the reasons when it cannot help."""
    from hybrid_router.router.history import trusted_p95

    config = _router_config()
    if not config.history_enabled:
        return None, ["duration history is disabled ([hybrid_router] history_days = 0)"]
    stats, error = _read_run_stats(config.history_days)
    if error is not None:
        return None, [f"metadata database not reachable, duration history not used ({error})"]
    notes = []
    runs = stats[(dag_id, task_id)].runs if (dag_id, task_id) in stats else 0
    if runs < config.history_min_runs:
        notes.append(
            f"duration history: {runs} successful run(s) in the last {config.history_days} days, "
            f"fewer than [hybrid_router] history_min_runs = {config.history_min_runs}"
        )
    return lambda dag, task: trusted_p95(stats, dag, task, config.history_min_runs), notes


def _read_run_stats(days: int) -> tuple[dict[TaskKey, TaskRunStats], str | None]:
    """Every task's runs in the last ``days`` days, or an empty dict and why the database could not say."""
    from airflow.utils.session import create_session

    from hybrid_router.router.history import read_task_run_stats

    try:
        with create_session() as session:
            return read_task_run_stats(session, days=days), None
    except Exception as error:  # whatever the database layer raises: reported, never a traceback
        return {}, f"{type(error).__name__}: {str(error).splitlines()[0]}"


def _memory_lookup() -> tuple[MemoryLookup | None, list[str]]:
    """The memory the task's past runs measured (the router's ``run_finished`` rows), and why not when the
    database cannot say."""
    from airflow.utils.session import create_session

    from hybrid_router.router.measured_runs import memory_evidence, read_task_memory

    config = _router_config()
    if not config.history_enabled:
        return None, []
    try:
        with create_session() as session:
            memory = read_task_memory(session, days=config.history_days)
    except Exception as error:  # whatever the database layer raises: reported, never a traceback
        return None, [f"metadata database not reachable, measured memory not used ({type(error).__name__})"]
    return lambda dag, task: memory_evidence(memory.get((dag, task))), []


def explain(args: argparse.Namespace) -> None:
    """Print the decision for one task, and why."""
    policy, policy_path = _load_policy(args.policy)
    notes: list[str] = []
    history = None
    if args.expected_duration is None:
        history, notes = _history_lookup(args.dag_id, args.task_id)
    memory = None
    if args.memory_mb is None:  # the database is read only for the figures the command line does not give
        memory, memory_notes = _memory_lookup()
        notes += memory_notes
    facts: TaskFacts = resolve_facts(
        dag_id=args.dag_id,
        task_id=args.task_id,
        queue=args.queue,
        pool=args.pool,
        operator=args.operator,
        history=history,
        memory=memory,
    )
    if args.expected_duration is not None:
        facts = replace(
            facts, expected_duration_s=args.expected_duration, duration_source=COMMAND_LINE_SOURCE
        )
    if args.memory_mb is not None:
        facts = replace(facts, memory_mb=args.memory_mb, memory_source=COMMAND_LINE_SOURCE)
    decision = policy.explain(facts)  # like decide(), and says why each earlier rule did not take the task
    result = {"policy": policy_path, **decision.to_dict()}
    result["reasons"] = [*notes, *result["reasons"]]
    result["rule_line"] = _rule_line(policy, decision)
    if args.json:
        _print_json(result)
    else:
        print(_explanation_text(args, result))


def _rule_line(policy: Policy, decision: Decision) -> int | None:
    # rule_index is -1 when no rule took the task and the policy's defaults.run_on did
    return policy.rules[decision.rule_index].line if decision.rule_index >= 0 else None


def _explanation_text(args: argparse.Namespace, result: dict[str, Any]) -> str:
    rule = result["rule"]
    if result["rule_line"] is None:
        where = f"no rule matched, {rule}"
    else:
        where = f"rule {rule!r} at {result['policy']}:{result['rule_line']}"
    lines = [
        f"{args.dag_id}.{args.task_id} -> {result['executor']}",
        f"  decided by: {where}",
        f"  overflow:   {', '.join(result['overflow']) or 'none (waits for a free slot)'}",
        f"  fallback:   {_fallback_text(result)}",
        f"  duration:   {format_duration(result['expected_duration_s'])} from {result['duration_source']}",
        f"  memory:     {_memory_text(result)}",
        "  why:",
    ]
    lines += [f"    - {reason}" for reason in result["reasons"]]
    return "\n".join(lines)


def _fallback_text(result: dict[str, Any]) -> str:
    default = ", ".join(result["fallback"]) or "none (an infrastructure failure fails the try)"
    by_reason = result.get("fallback_by_reason") or {}
    if not by_reason:
        return default
    named = [f"{reason}: {', '.join(names) or 'none'}" for reason, names in by_reason.items()]
    return "; ".join([*named, f"any other reason: {default}"])


def _memory_text(result: dict[str, Any]) -> str:
    # a measured figure says how it was worked out ("1,824 MB: p95 of 14 runs x 1.2")
    if result.get("memory_basis"):
        return str(result["memory_basis"])
    return f"{format_memory(result['memory_mb'])} from {result['memory_source']}"


# simulate ----------------------------------------------------------------------------------------------


def _check_table_options(args: argparse.Namespace) -> None:
    # Airflow's CLI has no mutually exclusive groups: re-check what the standalone parser enforces
    if bool(args.tasks) == bool(args.from_db):
        _fail(EXIT_USAGE, "error: give exactly one of --tasks FILE.csv or --from-db")
    if args.days is not None and not args.from_db:
        _fail(EXIT_USAGE, "error: --days applies only with --from-db")


def _price_file(path: str | None) -> dict[str, Any] | None:
    """The ``--prices`` table, checked; exits 1 listing every problem with its place."""
    if path is None:
        return None
    from hybrid_router.router.policy.prices import load_prices

    try:
        return load_prices(path)
    except PolicyError as error:
        _fail(EXIT_INVALID, *(str(issue) for issue in error.issues), f"{path}: invalid price table")


def _read_history(days: int) -> tuple[MeasuredHistory | None, str | None]:
    """The measured history of the last ``days`` days, or None and why the database could not say."""
    from airflow.utils.session import create_session

    from hybrid_router.router.cost_model import read_measured_history

    try:
        with create_session() as session:
            return read_measured_history(session, days=days), None
    except Exception as error:  # whatever the database layer raises: reported, never a traceback
        return None, f"{type(error).__name__}: {str(error).splitlines()[0]}"


def _history_from_db(args: argparse.Namespace) -> tuple[MeasuredHistory, int, str]:
    """(history, history_min_runs, a description of the source) for ``--from-db``; exits when unreadable."""
    config = _router_config()
    days = args.days if args.days is not None else config.history_days
    if days <= 0:
        _fail(EXIT_USAGE, "error: [hybrid_router] history_days is 0: pass --days N")
    history, error = _read_history(days)
    if history is None:
        _fail(EXIT_INVALID, f"error: cannot read the metadata database: {error}")
    if not history.stats:
        _fail(
            EXIT_INVALID, f"error: no successful task runs in the metadata database in the last {days} days"
        )
    return history, config.history_min_runs, f"metadata database, last {days} days"


def simulate(args: argparse.Namespace) -> None:
    """Route a task table (CSV or the metadata database) with one policy or two, and print where the work would
    go and what it would cost."""
    from hybrid_router.router.cost_model import Costing, MeasuredHistory
    from hybrid_router.router.pricing import price_table
    from hybrid_router.router.simulate import TaskTableError, compare_text, read_tasks_csv, rows_from_history
    from hybrid_router.router.simulate import simulate as run_simulation

    _check_table_options(args)
    policies = [_load_policy(args.policy)]
    if args.compare:
        policies.append(_load_policy(args.compare))
    prices = _price_file(args.prices)
    if args.tasks:
        try:
            rows = read_tasks_csv(args.tasks)
        except TaskTableError as error:
            _fail(EXIT_INVALID, *error.problems)
        history, source = MeasuredHistory(), args.tasks
    else:
        history, min_runs, source = _history_from_db(args)
        rows = rows_from_history(history.stats, min_runs, memory=history.memory())
    reports = [
        run_simulation(
            policy,
            rows,
            policy_file=path,
            source=source,
            costing=Costing(policy, price_table(policy.pricing, prices), history),
        )
        for policy, path in policies
    ]
    if args.html:
        _write_html(args.html, reports)
    if args.json:
        _print_json([report.to_dict() for report in reports] if args.compare else reports[0].to_dict())
    elif args.compare:
        print(compare_text(reports))
    else:
        print(reports[0].to_text())


def _write_html(path: str, reports: list[SimulationReport]) -> None:
    from pathlib import Path

    from hybrid_router.router.html_report import render_html

    try:
        Path(path).write_text(render_html(reports), encoding="utf-8")
    except OSError as error:
        _fail(EXIT_INVALID, f"error: cannot write {path}: {error.strerror or error}")
    print(f"wrote {path}", file=sys.stderr)  # stderr: --json output stays one JSON document


# recommend ---------------------------------------------------------------------------------------------


def recommend(args: argparse.Namespace) -> None:
    """Print the policy with a rule per task whose cheapest fitting executor is not where it goes today."""
    import yaml

    from hybrid_router.router.cost_model import MeasuredHistory
    from hybrid_router.router.pricing import price_table
    from hybrid_router.router.recommend import Recommender, advise_all, proposal_text

    _check_table_options(args)
    policy, path = _load_policy(args.policy)
    prices = price_table(policy.pricing, _price_file(args.prices))
    headroom = args.headroom if args.headroom is not None else policy.memory_headroom
    if args.tasks:
        needs, skipped = _needs_from_table(args.tasks, headroom, policy.defaults.memory_mb)
        history, source = MeasuredHistory(), args.tasks
    else:
        history, min_runs, source = _history_from_db(args)
        needs, skipped = _needs_from_history(history, policy, min_runs, headroom)
    advice = advise_all(Recommender(policy, prices, history.latencies, headroom=headroom), needs)
    with open(path, encoding="utf-8-sig") as handle:  # it loaded a moment ago: the proposal keeps all of it
        data = yaml.safe_load(handle)
    text = proposal_text(
        data, policy, advice, source=source, prices=prices, headroom=headroom, skipped=skipped
    )
    if args.json:
        _print_json(
            {
                "policy": path,
                "source": source,
                "prices": prices.to_dict(),
                "headroom": headroom,
                "tasks": [item.to_dict() for item in advice],
                "skipped": skipped,
                "proposal": text,
            }
        )
    else:
        print(text, end="")


def _needs_from_table(path: str, headroom: float, default_mb: int) -> tuple[list[TaskNeed], list[str]]:
    import math

    from hybrid_router.router.recommend import TaskNeed
    from hybrid_router.router.simulate import TaskTableError, read_tasks_csv

    try:
        rows = read_tasks_csv(path)
    except TaskTableError as error:
        _fail(EXIT_INVALID, *error.problems)
    needs, skipped = [], []
    for row in rows:
        facts = row.facts
        if facts.expected_duration_s is None:
            skipped.append(f"{facts.dag_id}.{facts.task_id} (no duration in the table)")
            continue
        memory, basis = None, f"not in the table: the policy's default {default_mb:,} MB"
        if facts.memory_mb is not None:
            memory = math.ceil(round(facts.memory_mb * headroom, 6))
            basis = f"{memory:,} MB: {facts.memory_mb:,} MB from the task table x {headroom:g}"
        needs.append(
            TaskNeed(
                facts.dag_id,
                facts.task_id,
                row.count,
                facts.expected_duration_s,
                facts.expected_duration_s,
                memory,
                basis,
                facts.queue,
                facts.pool,
                facts.operator,
            )
        )
    return needs, skipped


def _needs_from_history(
    history: MeasuredHistory, policy: Policy, min_runs: int, headroom: float
) -> tuple[list[TaskNeed], list[str]]:
    from hybrid_router.router.recommend import need_from_measurements

    memory = history.memory()
    needs, skipped = [], []
    for (dag_id, task_id), stats in sorted(history.stats.items()):
        if stats.runs < min_runs:
            skipped.append(
                f"{dag_id}.{task_id} ({stats.runs} successful runs, fewer than [hybrid_router] history_min_runs"
                f" = {min_runs})"
            )
            continue
        needs.append(
            need_from_measurements(
                dag_id=dag_id,
                task_id=task_id,
                runs=stats.runs,
                worker_seconds=stats.worker_seconds,
                p95_s=stats.p95_seconds,
                evidence=memory(dag_id, task_id),
                policy=policy,
                headroom=headroom,
                queue=stats.queue,
                pool=stats.pool,
                operator=stats.operator,
            )
        )
    return needs, skipped
