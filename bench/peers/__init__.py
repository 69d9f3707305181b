"""Benchmark drivers: one module per peer (``*_peer.py``), plus what they share."""
