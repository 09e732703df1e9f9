"""The policy engine: which executor runs a task, where it spills to, where it is re-run after an
infrastructure failure, and why.

Pure: it knows policy files, task facts and decisions, nothing of executors, AWS or the scheduler. The run
history lookup and the measured-memory lookup are handed in to ``resolve_facts`` as functions.
"""

from __future__ import annotations

from .engine import CacheInfo, Policy, Rule
from .errors import PolicyError, PolicyIssue
from .facts import (
    LearnedMemory,
    MemoryEvidence,
    MemoryLookup,
    OutOfMemory,
    learned_memory_need,
    resolve_facts,
)
from .loader import load_policy, load_policy_text
from .model import FAILURE_REASONS, Decision, Defaults, ExecutorSpec, Limits, TaskFacts, fallback_for_reason
from .units import format_duration, parse_duration, parse_memory_mb

__all__ = [
    "FAILURE_REASONS",
    "CacheInfo",
    "Decision",
    "Defaults",
    "ExecutorSpec",
    "LearnedMemory",
    "Limits",
    "MemoryEvidence",
    "MemoryLookup",
    "OutOfMemory",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "Rule",
    "TaskFacts",
    "fallback_for_reason",
    "format_duration",
    "learned_memory_need",
    "load_policy",
    "load_policy_text",
    "parse_duration",
    "parse_memory_mb",
    "resolve_facts",
]
