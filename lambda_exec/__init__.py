"""The Lambda path: executor, in-Lambda handler and a local Lambda service."""
