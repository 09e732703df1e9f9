"""The ``hybrid-router`` commands: one set of argument definitions for ``airflow hybrid-router ...`` and
``python -m hybrid_router ...``.

Airflow imports this module on every ``airflow`` invocation (it is the provider's ``cli`` entry), so it holds
only standard-library definitions: the command bodies live in ``cli_commands`` and are imported when a command
runs, and Airflow's own CLI classes are imported inside ``get_cli_commands``, which only Airflow's CLI calls.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.cli.cli_config import GroupCommand

GROUP_NAME = "hybrid-router"
GROUP_HELP = "Check routing policies and see where tasks would run"
COMMANDS_MODULE = "hybrid_router.router.cli_commands"

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def _parse_with(function_name: str, type_name: str) -> Callable[[str], Any]:
    """An argparse ``type`` that imports the policy engine's parser only when the option is given."""

    def parse(text: str) -> Any:
        module = importlib.import_module("hybrid_router.router.policy")
        try:
            return getattr(module, function_name)(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"invalid {type_name} {text!r}: {error}") from None

    parse.__name__ = type_name  # argparse names the type in its usage errors
    return parse


def _headroom(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 1 <= value <= 10:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be between 1 and 10, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


@dataclass(frozen=True)
class Option:
    """One command-line argument, in the two-part form both argparse and Airflow's ``Arg`` take."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExclusiveGroup:
    """Options of which at most one may be given (exactly one when ``required``)."""

    flags: tuple[str, ...]
    required: bool = False


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    function: str  # name of the body in COMMANDS_MODULE
    options: tuple[Option, ...]
    description: str | None = None
    # argparse mutually exclusive groups; Airflow's Arg has no such notion, so the body re-checks them for
    # `airflow hybrid-router` (see cli_commands.simulate)
    exclusive: tuple[ExclusiveGroup, ...] = ()


OPT_JSON = Option(("--json",), {"action": "store_true", "help": "print one JSON object instead of text"})
OPT_POLICY = Option(
    ("--policy",),
    {
        "metavar": "FILE",
        "help": "policy file (default: [hybrid_router] policy_file, or the packaged default policy)",
    },
)

VALIDATE = Command(
    name="validate",
    help="Check policy files; list every error as file:line:col: path: message",
    function="validate",
    options=(Option(("files",), {"metavar": "FILE", "nargs": "+", "help": "policy files to check"}),),
    description="Exit 0 when every file is valid (warnings are printed), 1 when any file has an error.",
)

EXPLAIN = Command(
    name="explain",
    help="Show which executor a task would run on, and why",
    function="explain",
    options=(
        OPT_POLICY,
        Option(("--dag-id",), {"required": True, "help": "the task's DAG id"}),
        Option(("--task-id",), {"required": True, "help": "the task's id"}),
        Option(("--queue",), {"help": "the task's queue"}),
        Option(("--pool",), {"help": "the task's pool"}),
        Option(("--operator",), {"help": "the task's operator class name"}),
        Option(
            ("--expected-duration",),
            {
                "type": _parse_with("parse_duration", "duration"),
                "metavar": "DURATION",
                "help": "expected run time, e.g. 90s, 5m, 1h (default: the p95 of the task's successful runs "
                "in the metadata database, else the policy's default)",
            },
        ),
        Option(
            ("--memory-mb",),
            {
                "type": _parse_with("parse_memory_mb", "memory"),
                "metavar": "MEMORY",
                "help": "memory the task needs, in MB or with a unit (3GB)",
            },
        ),
        OPT_JSON,
    ),
)

OPT_TASKS = Option(
    ("--tasks",),
    {
        "metavar": "FILE.csv",
        "help": "CSV with columns dag_id, task_id, queue, pool, operator, duration (5m or seconds), "
        "memory_mb and optionally count",
    },
)
OPT_FROM_DB = Option(
    ("--from-db",),
    {
        "action": "store_true",
        "help": "use the task runs in the metadata database and what the router measured",
    },
)
OPT_DAYS = Option(
    ("--days",),
    {
        "type": _positive_int,
        "metavar": "N",
        "help": "with --from-db: days of history to read (default: [hybrid_router] history_days)",
    },
)
OPT_PRICES = Option(
    ("--prices",),
    {
        "metavar": "FILE",
        "help": "price table (YAML or JSON, the shape of the policy's pricing section) over the policy's own and "
        "the packaged AWS list prices",
    },
)

SIMULATE = Command(
    name="simulate",
    help="Route a table of tasks (CSV or the metadata database) and summarise where they would run and the cost",
    function="simulate",
    options=(
        OPT_POLICY,
        OPT_TASKS,
        OPT_FROM_DB,
        OPT_DAYS,
        Option(
            ("--compare",),
            {"metavar": "OTHER.yaml", "help": "a second policy: both routed on the same tasks, side by side"},
        ),
        OPT_PRICES,
        Option(
            ("--html",),
            {
                "metavar": "PATH",
                "help": "also write the report, with charts, as one HTML file that works offline",
            },
        ),
        OPT_JSON,
    ),
    description="Prints tasks, task-hours, cost in dollars, total start latency and fallbacks expected from the "
    "measured failures, per executor and in all; with --compare, for both policies (--json: one object per policy).",
    exclusive=(ExclusiveGroup(("--tasks", "--from-db"), required=True),),
)

RECOMMEND = Command(
    name="recommend",
    help="Propose, per task, the cheapest executor and Lambda size that fits its measured p95, as a policy",
    function="recommend",
    options=(
        OPT_POLICY,
        OPT_TASKS,
        OPT_FROM_DB,
        OPT_DAYS,
        OPT_PRICES,
        Option(
            ("--headroom",),
            {
                "type": _headroom,
                "metavar": "X",
                "help": "multiply each task's p95 duration and memory by X (default: the policy's "
                "settings.memory_headroom)",
            },
        ),
        OPT_JSON,
    ),
    description="Prints the policy with one rule per task whose executor would change, ahead of its own rules; "
    "save it and check it with validate.",
    exclusive=(ExclusiveGroup(("--tasks", "--from-db"), required=True),),
)

COMMANDS: tuple[Command, ...] = (VALIDATE, EXPLAIN, SIMULATE, RECOMMEND)


def _body(command: Command) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        module = importlib.import_module(COMMANDS_MODULE)
        getattr(module, command.function)(args)

    run.__name__ = command.function
    return run


def build_parser(prog: str = "python -m hybrid_router") -> argparse.ArgumentParser:
    """The standalone parser used by ``python -m hybrid_router``; needs no Airflow configuration."""
    parser = argparse.ArgumentParser(prog=prog, description=GROUP_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name, help=command.help, description=command.description or command.help
        )
        grouped = {flag for group in command.exclusive for flag in group.flags}
        for exclusive in command.exclusive:
            group = sub.add_mutually_exclusive_group(required=exclusive.required)
            for option in command.options:
                if option.flags[0] in exclusive.flags:
                    group.add_argument(*option.flags, **option.kwargs)
        for option in command.options:
            if option.flags[0] not in grouped:
                sub.add_argument(*option.flags, **option.kwargs)
        sub.set_defaults(func=_body(command))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 invalid policy or input, 2 usage)."""
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except SystemExit as done:
        if done.code is None:
            return EXIT_OK
        return done.code if isinstance(done.code, int) else EXIT_INVALID
    return EXIT_OK


def get_cli_commands() -> list[GroupCommand]:
    """Airflow's provider ``cli`` hook: the same commands as ``airflow hybrid-router ...``."""
    from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand, lazy_load_command

    return [
        GroupCommand(
            name=GROUP_NAME,
            help=GROUP_HELP,
            subcommands=[
                ActionCommand(
                    name=command.name,
                    help=command.help,
                    func=lazy_load_command(f"{COMMANDS_MODULE}.{command.function}"),
                    args=[Arg(option.flags, **option.kwargs) for option in command.options],
                    description=command.description,
                )
                for command in COMMANDS
            ],
        )
    ]
