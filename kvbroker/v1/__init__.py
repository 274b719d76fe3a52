"""Generated from proto/kvbroker/v1 by scripts/gen_proto.py: do not edit.

Regenerate with ``python scripts/gen_proto.py``; CI runs ``--check`` and fails on a diff.
Only ``kvbroker.server`` and ``kvbroker_client`` (and tests) may import this package.
"""
