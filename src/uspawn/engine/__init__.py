"""The engine: a validated OCI Spec plus one engine request in, a running container
out. spec (model), plan (Spec -> host and init plans), runtime (parent side), init
(the two child stages), channel (their protocol), console (foreground wait, pty and
stdio relay), enter (joining a running container), hooks."""
