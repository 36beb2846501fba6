"""The state directory: container records, flock-held name claims and UID-range leases."""
