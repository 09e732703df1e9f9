"""Package data: the default policy and its JSON Schema."""

from pathlib import Path

POLICIES_DIR = Path(__file__).parent
DEFAULT_POLICY = POLICIES_DIR / "default.yaml"
SCHEMA = POLICIES_DIR / "policy.schema.json"
