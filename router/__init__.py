"""The routing executor, the policy engine and the CLI."""
