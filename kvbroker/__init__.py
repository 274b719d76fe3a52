"""kvbroker: a node-local daemon that owns KV-cache memory and hands it out zero-copy.

Importing this package imports nothing heavy (no grpc, torch or prometheus), so the
client stub and the pure core can be imported on their own.
"""

__version__ = "0.1.0"
