"""The AWS example: the CloudFormation template passes cfn-lint (no AWS account needed) and matches the handler."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "aws"
TEMPLATE = EXAMPLE / "template.yaml"
DOCKERFILE = EXAMPLE / "Dockerfile"


class _CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation's short-form tags (!Ref, !Sub, !GetAtt...) as plain values."""


def _any_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node)}
    return {suffix: loader.construct_mapping(node)}


_CfnLoader.add_multi_constructor("!", _any_tag)


def _cfn_lint() -> str:
    beside_python = Path(sys.executable).with_name("cfn-lint")
    found = str(beside_python) if beside_python.exists() else shutil.which("cfn-lint")
    if not found:
        pytest.skip("cfn-lint is not installed (it comes with the [test] extra)")
    return found


def test_template_passes_cfn_lint() -> None:
    result = subprocess.run([_cfn_lint(), str(TEMPLATE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_template_disables_lambda_retries_and_wires_the_dlq() -> None:
    template = yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)
    resources = template["Resources"]
    invoke_config = next(r for r in resources.values() if r["Type"] == "AWS::Lambda::EventInvokeConfig")
    assert invoke_config["Properties"]["MaximumRetryAttempts"] == 0
    assert template["Parameters"]["MaximumEventAgeInSeconds"]["Default"] <= 900
    function = next(r for r in resources.values() if r["Type"] == "AWS::Lambda::Function")["Properties"]
    assert function["PackageType"] == "Image"
    assert function["DeadLetterConfig"]["TargetArn"] == {"GetAtt": "DeadLetterQueue.Arn"}
    assert "ReservedConcurrentExecutions" in function
    # The function holds no key that signs other dispatches' results: each event carries its own.
    assert "HYBRID_ROUTER_SIGNING_SECRET" not in function["Environment"]["Variables"]
    assert not any("secretsmanager" in str(value) for value in function["Environment"]["Variables"].values())
    queues = [r for r in resources.values() if r["Type"] == "AWS::SQS::Queue"]
    assert len(queues) == 2 and not any(q["Properties"].get("FifoQueue") for q in queues)


def test_dockerfile_uses_the_lambda_base_image_and_an_importable_handler() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM public\.ecr\.aws/lambda/python:3\.12$", text, re.MULTILINE)
    (handler_path,) = re.findall(r'^CMD \["([^"]+)"\]$', text, re.MULTILINE)
    module_name, _, attribute = handler_path.rpartition(".")
    assert callable(getattr(importlib.import_module(module_name), attribute))
