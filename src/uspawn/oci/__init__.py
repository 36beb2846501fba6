"""Front: the runc-compatible OCI runtime `uspawn-runc` (cli), its lifecycle
(create/start/state/kill/delete, lifecycle), exec, and the `spec`/`features` defaults."""
