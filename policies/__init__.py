"""Package data: the default policy, its JSON Schema, and the default price table."""

from pathlib import Path

POLICIES_DIR = Path(__file__).parent
DEFAULT_POLICY = POLICIES_DIR / "default.yaml"
SCHEMA = POLICIES_DIR / "policy.schema.json"
PRICES = POLICIES_DIR / "prices.yaml"
