"""The policy engine: which executor runs a task, where it spills to, where it is re-run after an
infrastructure failure, and why.

Pure: it knows policy files, task facts and decisions, nothing of executors, AWS or the scheduler. The run
history lookup is handed in to ``resolve_facts`` as a function.
"""

from __future__ import annotations

from .engine import CacheInfo, Policy, Rule
from .errors import PolicyError, PolicyIssue
from .facts import resolve_facts
from .loader import load_policy, load_policy_text
from .model import Decision, Defaults, ExecutorSpec, Limits, TaskFacts
from .units import format_duration, parse_duration, parse_memory_mb

__all__ = [
    "CacheInfo",
    "Decision",
    "Defaults",
    "ExecutorSpec",
    "Limits",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "Rule",
    "TaskFacts",
    "format_duration",
    "load_policy",
    "load_policy_text",
    "parse_duration",
    "parse_memory_mb",
    "resolve_facts",
]
