"""Gives this process's SQS clients the faults in HYBRID_ROUTER_AWS_FAULTS (see devtools/aws_faults.py).

Python imports ``sitecustomize`` at start-up from the first folder of ``sys.path`` that has one: this folder is
put on ``PYTHONPATH`` (with the checkout) only for processes a fault-injection test or benchmark starts.
"""

import os

if os.environ.get("HYBRID_ROUTER_AWS_FAULTS"):
    from devtools.aws_faults import ENV, SqsFaults, install_in_every_session

    install_in_every_session(SqsFaults.from_json(os.environ[ENV]))
