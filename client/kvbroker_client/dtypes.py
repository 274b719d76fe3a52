"""Element types: a user's dtype (a ``torch.dtype`` or its name) to the wire's and back.

The one table is ``kvbroker.wire.DTYPES`` (wire value, torch attribute name, width),
shared with the daemon; torch dtypes are looked up from its names with
``getattr(torch, name)``, so nothing here can drift from the server's table.

Why a module of its own: building a request must not import torch (the operator CLI
imports this package and should not pay torch's seconds-long import to print a table),
while building a view needs torch. ``wire_dtype`` therefore resolves names against the
table without torch, and imports torch only for a name outside it (an alias such as
``"half"``) or when handed a ``torch.dtype`` (then torch is loaded already).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeAlias

from kvbroker import wire
from kvbroker_client.errors import InvalidRequest

if TYPE_CHECKING:
    import torch

__all__ = ["DTypeLike", "to_proto_dtype", "to_torch_dtype", "torch_dtype_of", "torch_dtypes", "wire_dtype"]

DTypeLike: TypeAlias = "torch.dtype | str"

_torch_by_value: dict[int, torch.dtype] | None = None


def torch_dtypes() -> dict[int, torch.dtype]:
    """Wire ``Dtype`` value -> torch dtype, for every entry of ``wire.DTYPES`` (imports
    torch; built once)."""
    global _torch_by_value
    if _torch_by_value is None:
        import torch

        _torch_by_value = {d.value: getattr(torch, d.name) for d in wire.DTYPES}
    return _torch_by_value


def _supported() -> str:
    return ", ".join(d.name for d in wire.DTYPES)


def wire_dtype(dtype: DTypeLike) -> wire.WireDtype:
    """The wire entry of a ``torch.dtype`` or a dtype name (``"float16"``,
    ``"torch.bfloat16"``, or a torch alias such as ``"half"``).

    Raises:
        InvalidRequest: not a dtype the broker knows; the message names ``dtype``.
    """
    torch_module = sys.modules.get("torch")
    if isinstance(dtype, str):
        name = dtype.strip().removeprefix("torch.")
        if name not in wire.DTYPE_BY_NAME and name.isidentifier():
            import torch as torch_module  # an alias: let torch resolve it

            resolved = getattr(torch_module, name, None)
            if isinstance(resolved, torch_module.dtype):
                name = str(resolved).removeprefix("torch.")
    elif torch_module is not None and isinstance(dtype, torch_module.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        raise InvalidRequest(f"dtype: expected a torch.dtype or a name, got {type(dtype).__name__}")
    entry = wire.DTYPE_BY_NAME.get(name)
    if entry is None:
        raise InvalidRequest(f"dtype: {dtype!r} is not supported (supported: {_supported()})")
    return entry


def to_proto_dtype(dtype: DTypeLike) -> int:
    """The wire ``Dtype`` value of a torch dtype or dtype name (``InvalidRequest`` if
    unsupported)."""
    return wire_dtype(dtype).value


def to_torch_dtype(dtype: DTypeLike) -> torch.dtype:
    """The torch dtype of a torch dtype or dtype name (``InvalidRequest`` if unsupported)."""
    return torch_dtypes()[wire_dtype(dtype).value]


def torch_dtype_of(value: int) -> torch.dtype | None:
    """The torch dtype of a wire ``Dtype`` value; None for ``DTYPE_UNSPECIFIED`` or a value
    this client does not know (a newer broker's: the view falls back to bytes)."""
    if value not in wire.DTYPE_BY_VALUE:
        return None
    return torch_dtypes()[value]
