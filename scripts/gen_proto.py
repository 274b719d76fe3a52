#!/usr/bin/env python3
"""Generate the Python code of the wire contract: ``proto/`` -> ``kvbroker/v1/``.

The ``.proto`` files under ``proto/`` are the only hand-written API contract. This script
runs grpcio-tools' bundled ``protoc`` with ``-I proto --python_out=. --pyi_out=.
--grpc_python_out=.``, so the output path mirrors the proto package (``kvbroker.v1`` ->
``kvbroker/v1/``) and the generated imports (``from kvbroker.v1 import broker_pb2``) work
without rewriting. The output is committed, so ``pip install -e .`` needs no build step.

Usage::

    python scripts/gen_proto.py           # regenerate in place
    python scripts/gen_proto.py --check   # exit 1 with a diff if the committed files differ

Output is deterministic: the same ``.proto`` files and the same grpcio-tools version
give byte-identical files, which is what makes ``--check`` meaningful in CI.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"

#: Suffixes of the files protoc writes for one ``x.proto``.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

INIT_TEXT = '''"""Generated from proto/kvbroker/v1 by scripts/gen_proto.py: do not edit.

Regenerate with ``python scripts/gen_proto.py``; CI runs ``--check`` and fails on a diff.
Only ``kvbroker.server`` and ``kvbroker_client`` (and tests) may import this package.
"""
'''


def proto_files() -> list[Path]:
    """Every ``.proto`` under ``proto/``, relative to it, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root`` and write each generated package's ``__init__.py``.

    Returns:
        The generated files, relative to ``out_root``, sorted.

    Raises:
        SystemExit: protoc failed (its diagnostics are already on stderr).
    """
    from grpc_tools import protoc  # dev dependency: imported only when generating

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    protos = proto_files()
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(PROTO_ROOT / p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package_dir in sorted({p.parent for p in protos}):
        (out_root / package_dir / "__init__.py").write_text(INIT_TEXT)
    return sorted(
        path.relative_to(out_root)
        for path in out_root.rglob("*")
        if path.is_file() and (path.name == "__init__.py" or path.name.endswith(GENERATED_SUFFIXES))
    )


def committed_files() -> list[Path]:
    """Generated-looking files now in the tree, relative to the repo root."""
    found: set[Path] = set()
    for package_dir in {p.parent for p in proto_files()}:
        directory = REPO_ROOT / package_dir
        if directory.is_dir():
            for path in directory.iterdir():
                if path.is_file() and (
                    path.name == "__init__.py" or path.name.endswith(GENERATED_SUFFIXES)
                ):
                    found.add(path.relative_to(REPO_ROOT))
    return sorted(found)


def check() -> int:
    """Regenerate into a temporary directory and diff against the tree.

    Returns:
        0 when identical, 1 (after printing a unified diff) when not.
    """
    with tempfile.TemporaryDirectory(prefix="kvbroker-gen-") as tmp:
        fresh_root = Path(tmp)
        fresh = generate(fresh_root)
        differences = 0
        for rel in sorted(set(fresh) | set(committed_files())):
            new_path, old_path = fresh_root / rel, REPO_ROOT / rel
            new = new_path.read_text().splitlines(keepends=True) if new_path.exists() else []
            old = old_path.read_text().splitlines(keepends=True) if old_path.exists() else []
            if new != old:
                differences += 1
                sys.stdout.writelines(
                    difflib.unified_diff(old, new, f"a/{rel}", f"b/{rel} (regenerated)")
                )
    if differences:
        print(
            f"\n{differences} generated file(s) are out of date: "
            "run `python scripts/gen_proto.py` and commit the result.",
            file=sys.stderr,
        )
        return 1
    print("generated code is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and exit 1 with a diff if the tree differs",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    with tempfile.TemporaryDirectory(prefix="kvbroker-gen-") as tmp:
        for rel in generate(Path(tmp)):
            target = REPO_ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, target)
            print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
