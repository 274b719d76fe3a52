"""The cases of benchmarks/rpc_latency.py, one module each."""
