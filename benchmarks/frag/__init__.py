"""The parts of benchmarks/fragmentation.py, one module each."""
