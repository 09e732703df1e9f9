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
from hybrid_router.router.policy import Decision, Policy, PolicyError, TaskFacts, load_policy, resolve_facts
from hybrid_router.router.policy.units import format_duration, format_memory

if TYPE_CHECKING:
    from hybrid_router.router.config import RouterConfig
    from hybrid_router.router.history import TaskKey, TaskRunStats

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


def explain(args: argparse.Namespace) -> None:
    """Print the decision for one task, and why."""
    policy, policy_path = _load_policy(args.policy)
    notes: list[str] = []
    history = None
    if args.expected_duration is None:
        history, notes = _history_lookup(args.dag_id, args.task_id)
    facts: TaskFacts = resolve_facts(
        dag_id=args.dag_id,
        task_id=args.task_id,
        queue=args.queue,
        pool=args.pool,
        operator=args.operator,
        history=history,
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
        f"  fallback:   {', '.join(result['fallback']) or 'none (an infrastructure failure fails the try)'}",
        f"  duration:   {format_duration(result['expected_duration_s'])} from {result['duration_source']}",
        f"  memory:     {format_memory(result['memory_mb'])} from {result['memory_source']}",
        "  why:",
    ]
    lines += [f"    - {reason}" for reason in result["reasons"]]
    return "\n".join(lines)


# simulate ----------------------------------------------------------------------------------------------


def simulate(args: argparse.Namespace) -> None:
    """Route a task table (CSV or the metadata database) and print where the work would go."""
    from hybrid_router.router.simulate import TaskTableError, read_tasks_csv, rows_from_history
    from hybrid_router.router.simulate import simulate as run_simulation

    # Airflow's CLI has no mutually exclusive groups: re-check what the standalone parser enforces
    if bool(args.tasks) == bool(args.from_db):
        _fail(EXIT_USAGE, "error: give exactly one of --tasks FILE.csv or --from-db")
    if args.days is not None and not args.from_db:
        _fail(EXIT_USAGE, "error: --days applies only with --from-db")
    policy, policy_path = _load_policy(args.policy)
    if args.tasks:
        try:
            rows = read_tasks_csv(args.tasks)
        except TaskTableError as error:
            _fail(EXIT_INVALID, *error.problems)
        source = args.tasks
    else:
        config = _router_config()
        days = args.days if args.days is not None else config.history_days
        if days <= 0:
            _fail(EXIT_USAGE, "error: [hybrid_router] history_days is 0: pass --days N")
        stats, error = _read_run_stats(days)
        if error is not None:
            _fail(EXIT_INVALID, f"error: cannot read the metadata database: {error}")
        rows = rows_from_history(stats, config.history_min_runs)
        if not rows:
            _fail(
                EXIT_INVALID,
                f"error: no successful task runs in the metadata database in the last {days} days",
            )
        source = f"metadata database, last {days} days"
    report = run_simulation(policy, rows, policy_file=policy_path, source=source)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.to_text())
