"""Container trees on the host: the built-in busybox rootfs, files read inside a tree."""
