"""Gateway keys: the stock HMAC rule, key files, per-key paths, token scopes, and the [gateway] config."""

from __future__ import annotations

import base64

import pytest

from rcds.publish.config import settings_from_dict
from rcds.publish.gateway_auth import (
    GatewayKeys,
    GatewayRefusal,
    authorization,
    parse_key_file,
    split_lease_path,
    storage_create_paths,
)
from rcds.tomlconfig import ConfigError

FOX = b"The quick brown fox jumps over the lazy dog"
FOX_HMAC_HEX = "de7c9b85b8b78aa6bc8a7a36f70a90701c9db4d9"  # HMAC-SHA1 with key "key" (RFC 2104 examples)


def test_authorization_is_base64_of_the_hex_digest() -> None:
    assert authorization("k1", "key", FOX) == "k1 " + base64.b64encode(FOX_HMAC_HEX.encode()).decode()


def test_verify_names_the_key_and_refuses_anything_else() -> None:
    keys = GatewayKeys({"k1": "key"}, {"k1": ["repo.test/users/a"]})
    assert keys.verify(authorization("k1", "key", FOX), FOX) == "k1"
    for header in (
        authorization("k1", "key", FOX + b"!"),  # another message
        authorization("k1", "other", FOX),  # another secret
        authorization("k2", "key", FOX),  # unknown key
        "k1",
        "k1 not-base64!",
        None,
    ):
        with pytest.raises(GatewayRefusal, match="invalid_hmac"):
            keys.verify(header, FOX)


def test_key_paths_are_component_wise() -> None:
    keys = GatewayKeys({"k1": "s", "k2": "s"}, {"k1": ["repo.test/users/a"], "k3": ["repo.test/"]})
    assert keys.may_lease("k1", "repo.test", "users/a")
    assert keys.may_lease("k1", "repo.test", "users/a/b")
    assert not keys.may_lease("k1", "repo.test", "users/ab")
    assert not keys.may_lease("k1", "repo.test", "users")
    assert not keys.may_lease("k1", "other.test", "users/a")
    assert not keys.may_lease("k2", "repo.test", "users/a")  # a key without paths leases nothing
    assert keys.may_lease("k3", "repo.test", "anything")


def test_key_files_and_lease_paths() -> None:
    assert parse_key_file("# comment\n\nplain_text id1 s3cret\n") == {"id1": "s3cret"}
    with pytest.raises(ValueError, match="line 1"):
        parse_key_file("id1 s3cret\n")
    assert split_lease_path("repo.test/users//a/") == ("repo.test", "users/a")
    assert split_lease_path("repo.test/") == ("repo.test", "")
    with pytest.raises(GatewayRefusal):
        split_lease_path("repo.test/users/../b")


def test_token_scopes() -> None:
    scope = "compute.create storage.create:/users/c storage.read:/ storage.create:/ storage.create:/x/../y"
    assert storage_create_paths(scope) == ("users/c", "")
    assert storage_create_paths(None) == ()


def test_gateway_config() -> None:
    base = {"repository": [{"name": "repo.test"}]}
    s = settings_from_dict({**base, "gateway": {"key_files": ["k.gw"], "key_paths": {"a": ["repo.test/u/a"]},
                                                "max_lease_time": 60}})  # fmt: skip
    assert s.gateway.enabled and s.gateway.key_paths == {"a": ("repo.test/u/a",)}
    assert s.gateway.max_lease_time == 60 and s.gateway.key_files[0].name == "k.gw"
    assert not settings_from_dict(base).gateway.enabled
    for bad in ({"key_paths": {"a": [1]}}, {"max_lease_time": 0}, {"unknown": 1}):
        with pytest.raises(ConfigError):
            settings_from_dict({**base, "gateway": bad})
