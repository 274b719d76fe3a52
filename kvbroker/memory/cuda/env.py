"""The CUDA allocator settings the broker needs, applied before torch is imported.

PyTorch reads ``PYTORCH_CUDA_ALLOC_CONF`` (and its newer name ``PYTORCH_ALLOC_CONF``) once,
when its CUDA allocator starts. Two settings make segments unshareable by CUDA IPC:

* ``expandable_segments:True``: blocks are exported as a different handle kind (``'e'``)
  whose import needs ``pidfd_getfd`` in the client, which fails in containers and across
  PID namespaces;
* a ``backend`` other than ``native`` (e.g. ``cudaMallocAsync``): it cannot export IPC
  handles at all.

So the daemon calls ``configure_cuda_allocator_env`` before anything imports torch. This
module itself never imports torch.
"""

from __future__ import annotations

import os
import re
import sys

_ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
_EXPANDABLE = re.compile(r"expandable_segments\s*:\s*(\w+)", re.IGNORECASE)
_BACKEND = re.compile(r"backend\s*:\s*(\w+)")


def _conf_problem(conf: str | None) -> str | None:
    """What in an allocator config string stops CUDA IPC sharing, or None."""
    if not conf:
        return None
    expandable = _EXPANDABLE.search(conf)
    if expandable and expandable[1].lower() == "true":
        return "expandable_segments:True"
    backend = _BACKEND.search(conf)
    if backend and backend[1] != "native":
        return f"backend:{backend[1]}"
    return None


def _with_expandable_off(conf: str | None) -> str:
    if not conf or not conf.strip(" ,"):
        return "expandable_segments:False"
    if _EXPANDABLE.search(conf):
        return _EXPANDABLE.sub("expandable_segments:False", conf)
    return conf.rstrip(" ,") + ",expandable_segments:False"


def configure_cuda_allocator_env() -> None:
    """Make PyTorch's CUDA allocator produce shareable ``cudaMalloc`` blocks.

    Call it before anything imports torch. It sets ``PYTORCH_CUDA_ALLOC_CONF`` (and
    ``PYTORCH_ALLOC_CONF`` when set) to the user's settings with
    ``expandable_segments:False``, keeping the other keys. Cost: string edits only.

    Raises:
        RuntimeError: torch is already imported and the environment asks for expandable
            segments or a non-native backend, which can no longer be undone; or the
            environment asks for a non-native backend (``cudaMallocAsync`` cannot share
            IPC handles).
    """
    problems = [
        f"{var}={os.environ[var]!r} ({problem})"
        for var in _ALLOC_CONF_VARS
        if (problem := _conf_problem(os.environ.get(var))) is not None
    ]
    if "torch" in sys.modules:
        if problems:
            raise RuntimeError(
                "torch was imported before configure_cuda_allocator_env() with "
                + "; ".join(problems)
                + ": CUDA segments would not be shareable by IPC. Call "
                "configure_cuda_allocator_env() before importing torch, or unset that setting."
            )
        return
    if any("backend:" in p for p in problems):
        raise RuntimeError(
            "; ".join(problems) + ": only the native caching allocator can share CUDA IPC handles"
        )
    base = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = _with_expandable_off(base)
    if "PYTORCH_ALLOC_CONF" in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = _with_expandable_off(os.environ["PYTORCH_ALLOC_CONF"])
