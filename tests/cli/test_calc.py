"""``kvbroker calc`` run as a user runs it (a real process, no broker), and the client
library's ``kv_calc``: one arithmetic, checked against the seed's worked example."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kvbroker_client
from tests.support.daemon import ROOT, child_env

LLAMA_7B = ["--layers", "32", "--kv-heads", "32", "--head-dim", "64", "--dtype", "float32", "--block-tokens", "16"]


def calc(*argv: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "kvbroker", "calc", *argv], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (done.returncode == 0) == ok, done.stderr
    return done


def test_the_seeds_llama_7b_example_prints_2048_blocks_and_17_2_gb():
    out = calc(*LLAMA_7B, "--tokens", "32768").stdout
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["blocks"] == "2048"
    assert lines["tokens"] == "32768"
    assert "524288 B = 32 layers x 2 (K, V) x 32 heads x 64 x 4 B" in out
    assert "8388608 B = 16 tokens" in out
    assert "17179869184 B, 17.2 GB" in lines["total"]


def test_the_reverse_gives_the_tokens_a_budget_holds_and_json_has_every_figure():
    figures = json.loads(calc(*LLAMA_7B, "--bytes", "24GiB", "--json").stdout)
    assert figures == {
        "num_layers": 32, "num_kv_heads": 32, "head_dim": 64, "dtype": "float32", "block_tokens": 16,
        "bytes_per_token": 524288, "bytes_per_block": 8388608, "blocks": 3072, "tokens": 49152,
        "total_bytes": 24 * 2**30,
    }  # fmt: skip


def test_tokens_round_up_to_whole_blocks_and_say_so():
    out = calc("--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--tokens", "17").stdout
    assert "tokens     32 (17 asked, rounded up to whole blocks)" in out
    assert "blocks     2" in out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--layers", "0", "--kv-heads", "2", "--head-dim", "8", "--tokens", "1"], "--layers: must be at least 1"),
        (["--layers", "2", "--kv-heads", "2", "--head-dim", "8"], "one of the arguments --tokens --bytes is required"),
        (["--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--tokens", "4", "--bytes", "1GiB"], "not allowed with"),
        (["--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--dtype", "float13", "--tokens", "4"], "invalid choice"),
        (["--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--bytes", "lots"], "--bytes"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(argv, says):
    done = calc(*argv, ok=False)
    assert done.returncode == 2
    assert says in done.stderr


def test_the_client_library_has_the_same_function():
    result = kvbroker_client.kv_calc(layers=32, kv_heads=32, head_dim=64, dtype="float32", tokens=32768)
    assert (result.blocks, result.total_bytes) == (2048, 17179869184)
    assert kvbroker_client.KvLayout(32, 32, 64, "float32").bytes_per_token == 524288
    with pytest.raises(ValueError, match="exactly one"):
        kvbroker_client.kv_calc(layers=2, kv_heads=2, head_dim=8)
