"""Front: nspawn-style machines. `uspawn run`, `boot`, `list`, `status`, `exec`,
`shell`, `stop`, `kill`, `logs`: argv -> Spec + engine request (launch, presets),
the booted machine's supervisor (boot), commands on running machines (control)."""
