"""Test support shared by tests/ and benchmarks/: a real daemon launcher (``daemon``) and
condition waits (``wait``). Importable without pytest."""
