"""The wheel holds only the product, and the product imports none of the test extras."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Imports of every product module in a fresh interpreter, with the test extras refused. The Amazon provider is
# installed with the test extra and Airflow's provider discovery loads its provider info on `import airflow`:
# only its executor and hook modules count, so they are looked for afterwards instead of refused.
IMPORT_ALL = """
import importlib, json, sys
REFUSED = ("moto", "pytest", "hypothesis", "cfnlint", "psycopg2", "asyncpg", "devtools")

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            raise ImportError(f"a product module imported {name!r}, which only the test extras install")

sys.meta_path.insert(0, Refuse())
failures = {}
for module in json.loads(sys.argv[1]):
    try:
        importlib.import_module(module)
    except Exception as exc:
        failures[module] = f"{type(exc).__name__}: {exc}"
amazon = sorted(m for m in sys.modules if m.startswith("airflow.providers.amazon.aws"))
print(json.dumps({"failures": failures, "amazon": amazon}))
"""


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    # From a copy: setuptools reuses a checkout's build/ folder, where a module that moved away may linger.
    source = tmp_path_factory.mktemp("source") / "checkout"
    shutil.copytree(
        REPO_ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_the_wheel_holds_no_demo_or_dev_stack(wheel_names):
    modules = [name for name in wheel_names if name.endswith(".py")]
    assert "hybrid_router/lambda_exec/local/__main__.py" in modules  # the local Lambda service ships
    assert not [m for m in modules if not m.startswith("hybrid_router/")]
    assert not [m for m in modules if any(word in m for word in ("demo", "devstack", "devtools", "tests/"))]


def test_every_module_of_the_wheel_imports_without_the_test_extras(wheel_names, tmp_path):
    modules = sorted(
        name[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        for name in wheel_names
        if name.endswith(".py") and not name.endswith("__main__.py")
    )
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, json.dumps(modules)],
        cwd=tmp_path,  # not the checkout: devtools/ and tests/ must not be importable by accident
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failures"] == {}
    assert report["amazon"] == [], "a product module imports the Amazon provider at import time"
