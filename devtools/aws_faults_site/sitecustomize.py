"""Gives this process's AWS clients the faults of devtools/aws_faults.py: fixed ones from
HYBRID_ROUTER_AWS_FAULTS (JSON), or those of the file named in HYBRID_ROUTER_AWS_FAULTS_FILE, checked at each call.

Python imports ``sitecustomize`` at start-up from the first folder of ``sys.path`` that has one: this folder is
put on ``PYTHONPATH`` (with the checkout) only for processes a fault-injection test or benchmark starts.
"""

import os

if os.environ.get("HYBRID_ROUTER_AWS_FAULTS_FILE"):
    from devtools.aws_faults import FILE_ENV, FaultsFile, install_in_every_session

    install_in_every_session(FaultsFile(os.environ[FILE_ENV]))
elif os.environ.get("HYBRID_ROUTER_AWS_FAULTS"):
    from devtools.aws_faults import ENV, SqsFaults, install_in_every_session

    install_in_every_session(SqsFaults.from_json(os.environ[ENV]))
