"""The ``[auth]`` section of the configuration, parsed into an ``AuthPolicy``.

```toml
[[auth.principals]]
name = "vista-worker"
token_file = "/run/secrets/vista-token"      # or token_sha256 = "<hex>", or token_env = "VAR"
uids = [1001]                                 # Unix peers with this uid (handshake socket)
tls_names = ["vista.workers.example"]         # client-certificate CN or DNS SAN
pools = { vista = ["allocate", "attach", "release"] }
operator = false                              # or true, or ["list", "defragment", ...]
```

Parsing only; errors are ``ValueError`` whose message starts with the key at fault
(``auth.principals[0].pools.vista``), which ``kvbroker.config`` turns into its
``ConfigError``. Tokens are never part of a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvbroker.security.policy import (
    OPERATOR_ACTIONS,
    POOL_ACTIONS,
    AuthPolicy,
    Principal,
    load_token,
    parse_actions,
)
from kvbroker.wire import ID_PATTERN

_PRINCIPAL_KEYS = {"name", "token_sha256", "token_file", "token_env", "uids", "tls_names", "pools", "operator"}


def parse_auth(table: Any, environ: Mapping[str, str] | None = None) -> AuthPolicy:
    """An ``AuthPolicy`` from the ``[auth]`` table (``{"principals": [...]}``)."""
    if not isinstance(table, dict):
        raise ValueError("auth: expected a table")
    unknown = set(table) - {"principals"}
    if unknown:
        raise ValueError(f"auth.{sorted(unknown)[0]}: unknown key (known: principals)")
    items = table.get("principals", [])
    if not isinstance(items, list):
        raise ValueError("auth.principals: expected [[auth.principals]] tables")
    return AuthPolicy([_principal(f"auth.principals[{i}]", t, environ) for i, t in enumerate(items)])


def _principal(key: str, table: Any, environ: Mapping[str, str] | None) -> Principal:
    if not isinstance(table, dict):
        raise ValueError(f"{key}: expected a table")
    for name in table:
        if name not in _PRINCIPAL_KEYS:
            raise ValueError(f"{key}.{name}: unknown key (known: {', '.join(sorted(_PRINCIPAL_KEYS))})")
    name = table.get("name")
    if not isinstance(name, str) or not ID_PATTERN.fullmatch(name):
        raise ValueError(f"{key}.name: expected an id such as \"vista-worker\"")
    for field in ("token_sha256", "token_file", "token_env"):
        if field in table and not isinstance(table[field], str):
            raise ValueError(f"{key}.{field}: expected a string")
    tokens = load_token(
        key, sha256=table.get("token_sha256"), file=table.get("token_file"),
        env=table.get("token_env"), environ=environ,
    )
    uids = table.get("uids", [])
    if not isinstance(uids, list) or not all(type(u) is int and 0 <= u < 2**32 for u in uids):
        raise ValueError(f"{key}.uids: expected a list of uids (integers)")
    tls_names = table.get("tls_names", [])
    if not isinstance(tls_names, list) or not all(isinstance(n, str) and n for n in tls_names):
        raise ValueError(f"{key}.tls_names: expected a list of certificate names")
    if not (tokens or uids or tls_names):
        raise ValueError(f"{key}: a principal needs a credential: a token, uids or tls_names")
    pools_table = table.get("pools", {})
    if not isinstance(pools_table, dict):
        raise ValueError(f"{key}.pools: expected a table such as {{ vista = [\"allocate\", \"attach\", \"release\"] }}")
    pools = {
        pool: parse_actions(f"{key}.pools.{pool}", actions, POOL_ACTIONS)
        for pool, actions in pools_table.items()
    }
    operator = parse_actions(f"{key}.operator", table.get("operator", False), OPERATOR_ACTIONS)
    return Principal(
        name=name, pools=pools, operator=operator, token_sha256=tokens,
        uids=frozenset(uids), tls_names=frozenset(tls_names),
    )
