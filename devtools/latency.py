"""The honest-speed latency model: what a benchmark stack adds to every AWS call, in every process, so that the
local stack answers as AWS in one region would.

It is the fault layer's two halves set together:

- Lambda: the local Lambda service answers each async Invoke after a log-normal latency
  (``FaultSettings.invoke_latency``, ``lambda_exec/local/faults.py``). It is added by the service, so every caller
  (the provider's executor, ours, the router's children) sees the same;
- SQS: each call waits a log-normal latency in the calling process (``devtools/aws_faults.py``, botocore's hooks):
  in every Python process started with ``process_env()`` (Airflow's scheduler and its workers, the local Lambda
  service, its sandboxes and the processes they start). A receive pays it when it brings messages or is a short
  poll, not on top of an empty long poll's wait (see ``aws_faults``).

Default figures (the honest-speed issue's; the published in-region figures found are older and no more precise,
e.g. Amazon's own 2012 re-measurement of a 1 KB SQS send from EC2 in us-east-1: 16 ms): async Invoke 25 ms
median, SQS 8 ms median, each p99 three times its median. Tests leave it off (an instant stack); benchmarks pass
``AWS_LIKE`` to the local service (``lambda_faults()``) and to the environment of every process
(``process_env()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from devtools import aws_faults
from devtools.aws_faults import SqsFaults
from hybrid_router.lambda_exec.local.faults import FaultSettings, Latency


@dataclass(frozen=True)
class LatencyModel:
    invoke_median_ms: float = 25.0
    sqs_median_ms: float = 8.0
    p99_factor: float = 3.0

    def lambda_faults(self, **changes: Any) -> FaultSettings:
        """The local Lambda service's settings: its async Invoke latency (``changes``: other faults)."""
        latency = Latency.from_median_ms(self.invoke_median_ms, self.p99_factor)
        return FaultSettings(invoke_latency=latency, **changes)

    def sqs_faults(self, **changes: Any) -> SqsFaults:
        """The SQS latency of every process (``changes``: other faults, ``calls_log``...)."""
        return SqsFaults(latency_median_ms=self.sqs_median_ms, latency_p99_factor=self.p99_factor, **changes)

    def process_env(self, base_pythonpath: str | None = None, **changes: Any) -> dict[str, str]:
        """The environment that gives a process (and its children) the SQS half of the model."""
        return aws_faults.process_env(self.sqs_faults(**changes), base_pythonpath)

    def describe(self) -> str:
        factor = f"{self.p99_factor:g}"
        return (
            f"async Invoke {self.invoke_median_ms:g} ms median (p99 {factor}x), every SQS call"
            f" {self.sqs_median_ms:g} ms median (p99 {factor}x; a receive when it brings messages or is a"
            " short poll), log-normal, in every process"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "invoke_median_ms": self.invoke_median_ms,
            "invoke_p99_ms": self.invoke_median_ms * self.p99_factor,
            "sqs_median_ms": self.sqs_median_ms,
            "sqs_p99_ms": self.sqs_median_ms * self.p99_factor,
            "distribution": "log-normal",
            "sqs_receive": "with messages or short poll only",
        }


AWS_LIKE = LatencyModel()
