"""``kvbroker calc``: the memory a paged KV cache needs, or the tokens a budget holds.

It runs offline (no broker is asked) on ``kvbroker.kvlayout.calculate``, the function
the daemon uses for a pool's ``max_tokens`` and the client library exports as
``kvbroker_client.kv_calc``, so the three never disagree.
"""

from __future__ import annotations

import argparse

from kvbroker.cli.formatting import dumps, format_bytes
from kvbroker.kvlayout import DEFAULT_BLOCK_TOKENS, Calculation, calculate
from kvbroker.wire import DTYPES


def add_parser(commands: argparse._SubParsersAction, positive_int, size) -> None:  # noqa: ANN001 - argparse types
    """Register ``calc`` (its flags take the CLI's own argument types)."""
    calc = commands.add_parser(
        "calc", help="memory for a paged KV cache, or tokens in a budget (offline)",
        description="The seed's arithmetic for a paged KV cache: per layer K and V of shape "
        "(blocks, block tokens, KV heads, head dim). With --tokens: blocks, bytes per block and per token, "
        "total bytes. With --bytes: the tokens (whole blocks) that fit. Asks no broker.",
    )  # fmt: skip
    calc.add_argument("--layers", type=positive_int, required=True, help="attention layers")
    calc.add_argument("--kv-heads", type=positive_int, required=True, help="KV heads per layer (GQA: fewer than query heads)")
    calc.add_argument("--head-dim", type=positive_int, required=True, help="dimension of one head")
    calc.add_argument("--dtype", default="float16", choices=[d.name for d in DTYPES], help="element type (default float16)")
    calc.add_argument("--block-tokens", type=positive_int, default=DEFAULT_BLOCK_TOKENS,
                      help=f"tokens per block (default {DEFAULT_BLOCK_TOKENS})")  # fmt: skip
    budget = calc.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=positive_int, help="tokens to hold: what they cost")
    budget.add_argument("--bytes", type=size, metavar="SIZE", help="a budget (24GiB, 17.2GB, bytes): the tokens it holds")
    calc.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the figures as JSON")
    calc.set_defaults(offline=run)


def run(args: argparse.Namespace) -> str:
    result = calculate(
        layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
        block_tokens=args.block_tokens, tokens=args.tokens, nbytes=args.bytes,
    )  # fmt: skip
    if getattr(args, "json", False):
        return dumps(result.as_dict())
    return render(result, asked_bytes=args.bytes, asked_tokens=args.tokens)


def render(result: Calculation, asked_bytes: int | None = None, asked_tokens: int | None = None) -> str:
    """The seed's arithmetic, one figure a line, each with its exact byte count."""
    lay = result.layout
    lines = [
        f"layout     {lay.num_layers} layers, {lay.num_kv_heads} KV heads, head dim {lay.head_dim}, "
        f"{lay.dtype}, {lay.block_tokens} tokens per block",
        f"per token  {format_bytes(lay.bytes_per_token)} ({lay.bytes_per_token} B = {lay.num_layers} layers x 2 (K, V) "
        f"x {lay.num_kv_heads} heads x {lay.head_dim} x {lay.itemsize} B)",
        f"per block  {format_bytes(lay.bytes_per_block)} ({lay.bytes_per_block} B = {lay.block_tokens} tokens)",
    ]
    if asked_bytes is not None:
        lines.append(f"budget     {format_bytes(asked_bytes)} ({asked_bytes} B)")
    lines += [
        f"blocks     {result.blocks}",
        f"tokens     {result.tokens}"
        + (f" ({asked_tokens} asked, rounded up to whole blocks)" if asked_tokens not in (None, result.tokens) else ""),
        f"total      {format_bytes(result.total_bytes)} ({result.total_bytes} B, {result.total_bytes / 1e9:.1f} GB)",
    ]
    return "\n".join(lines)
