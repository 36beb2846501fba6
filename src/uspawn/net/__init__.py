"""Container networking: veth/bridge links and nftables port publishing (links.py,
pyroute2 imported lazily), host-wide address and port leases (pool.py)."""
