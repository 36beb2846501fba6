"""The OCI runtime-tools validation suite: runner.py, expected.json, test_validation.py."""
