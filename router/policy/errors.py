"""What is wrong with a policy file, and where."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class PolicyIssue:
    """One problem found in a policy file; line and column are 1-based, ``path`` names the field."""

    file: str
    line: int
    column: int
    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.path}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
            "severity": self.severity,
        }


class PolicyError(ValueError):
    """A policy file that cannot be used; ``issues`` lists every error found, in file order."""

    def __init__(self, issues: Iterable[PolicyIssue], warnings: Iterable[PolicyIssue] = ()):
        self.issues: list[PolicyIssue] = sorted(issues, key=in_file_order)
        if not self.issues:
            raise ValueError("PolicyError needs at least one issue")
        # warnings found on the way, so that a validator can show them beside the errors
        self.warnings: list[PolicyIssue] = sorted(warnings, key=in_file_order)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    def __reduce__(self) -> tuple[type[PolicyError], tuple[list[PolicyIssue], list[PolicyIssue]]]:
        # the default would call __init__ with the message text; multiprocessing and loggers pickle errors
        return type(self), (self.issues, self.warnings)


def in_file_order(issue: PolicyIssue) -> tuple[int, int, str]:
    return issue.line, issue.column, issue.path


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string when none is close."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
