"""kvbroker's benchmarks, run from a checkout: ``python benchmarks/<name>.py [--json]``.

A package so that the scripts share benchmarks/harness.py and split their cases into
modules (benchmarks/rpc/, benchmarks/frag/); each script puts the repository root on
``sys.path`` first (see benchmarks/harness.py).
"""
