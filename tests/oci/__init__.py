"""podman driving an OCI runtime (runc now, uspawn-runc later): see conftest.py."""
