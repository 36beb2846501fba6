"""Front: diagnostics. `uspawn doctor` (what this kernel and host do to containers),
`uspawn check` (audit a tree), `uspawn selftest` (the kernel-upgrade canary)."""
