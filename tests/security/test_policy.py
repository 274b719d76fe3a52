"""Principals, credentials and rights: who may do what on which pool."""

import hashlib

import pytest

from kvbroker.security import (
    ANONYMOUS,
    Action,
    AuthPolicy,
    Credentials,
    PermissionDenied,
    Unauthenticated,
    parse_auth,
)


def _policy(tmp_path, environ=None):
    token_file = tmp_path / "ocr.token"
    token_file.write_text("ocr-secret\n")
    return parse_auth(
        {
            "principals": [
                {
                    "name": "vista",
                    "token_sha256": hashlib.sha256(b"vista-secret").hexdigest(),
                    "pools": {"vista": ["allocate", "attach", "release"]},
                },
                {"name": "ocr", "token_file": str(token_file), "uids": [1001], "pools": {"ocr": ["attach"]}},
                {"name": "ops", "token_env": "OPS_TOKEN", "tls_names": ["ops.example"], "operator": True},
            ]
        },
        environ or {"OPS_TOKEN": "ops-secret"},
    )


def test_no_principals_means_authorization_off():
    policy = AuthPolicy()
    assert not policy.enabled
    assert policy.authenticate(Credentials()) is ANONYMOUS
    for action in Action:
        AuthPolicy.check(ANONYMOUS, action, "any-pool")


def test_each_credential_proves_its_principal(tmp_path):
    policy = _policy(tmp_path)
    assert policy.authenticate(Credentials(bearer="vista-secret")).name == "vista"
    assert policy.authenticate(Credentials(bearer="ocr-secret")).name == "ocr"
    assert policy.authenticate(Credentials(peer_uid=1001)).name == "ocr"
    assert policy.authenticate(Credentials(tls_names=("x", "ops.example"))).name == "ops"
    assert policy.authenticate(Credentials(bearer="ops-secret")).name == "ops"


def test_missing_or_wrong_credentials_are_unauthenticated(tmp_path):
    policy = _policy(tmp_path)
    with pytest.raises(Unauthenticated):
        policy.authenticate(Credentials())
    with pytest.raises(Unauthenticated):
        policy.authenticate(Credentials(peer_uid=4242))
    # A wrong token is refused even when the peer uid would match: the caller meant it.
    with pytest.raises(Unauthenticated) as err:
        policy.authenticate(Credentials(bearer="guess", peer_uid=1001))
    assert "guess" not in str(err.value)


def test_rights_are_per_pool_and_operator_rights_are_separate(tmp_path):
    policy = _policy(tmp_path)
    vista = policy.authenticate(Credentials(bearer="vista-secret"))
    ocr = policy.authenticate(Credentials(peer_uid=1001))
    ops = policy.authenticate(Credentials(bearer="ops-secret"))
    AuthPolicy.check(vista, Action.ALLOCATE, "vista")
    with pytest.raises(PermissionDenied, match="may not allocate on pool 'ocr'"):
        AuthPolicy.check(vista, Action.ALLOCATE, "ocr")
    with pytest.raises(PermissionDenied):
        AuthPolicy.check(ocr, Action.ALLOCATE, "ocr")
    AuthPolicy.check(ocr, Action.ATTACH, "ocr")
    for action in (Action.LIST, Action.FORCE_RELEASE, Action.DEFRAGMENT, Action.SET_LIMITS):
        with pytest.raises(PermissionDenied):
            AuthPolicy.check(vista, action)
        AuthPolicy.check(ops, action)
    # An operator has no pool rights unless granted.
    with pytest.raises(PermissionDenied):
        AuthPolicy.check(ops, Action.ALLOCATE, "vista")
    assert vista.pools_with(Action.ATTACH) == frozenset({"vista"})
    assert ANONYMOUS.pools_with(Action.ATTACH) is None


@pytest.mark.parametrize(
    ("principal", "message"),
    [
        ({"name": "a"}, "needs a credential"),
        ({"name": "a", "uids": [1], "pools": {"p": ["fly"]}}, "auth.principals[0].pools.p: unknown action 'fly'"),
        ({"name": "a", "uids": [1], "operator": ["allocate"]}, "auth.principals[0].operator: unknown action"),
        ({"name": "a", "token_sha256": "abc"}, "token_sha256: expected 64 hex digits"),
        ({"name": "a", "token_env": "NOPE"}, "token_env: the variable NOPE is not set"),
        ({"name": "a", "token_env": "T", "token_file": "/x"}, "give one of"),
        ({"name": "a", "uids": ["1"]}, "uids: expected a list of uids"),
        ({"name": "a b", "uids": [1]}, "auth.principals[0].name"),
        ({"name": "a", "uids": [1], "colour": "red"}, "auth.principals[0].colour: unknown key"),
    ],
)
def test_bad_principals_name_the_key(principal, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_auth({"principals": [principal]}, {})


def test_a_credential_cannot_mean_two_principals():
    with pytest.raises(ValueError, match="share a credential"):
        parse_auth({"principals": [{"name": "a", "uids": [7]}, {"name": "b", "uids": [7]}]}, {})


def test_token_file_content_is_never_in_errors(tmp_path):
    secret = tmp_path / "t"
    secret.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        parse_auth({"principals": [{"name": "a", "token_file": str(secret)}]}, {})
