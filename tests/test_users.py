from __future__ import annotations

import hashlib

import pytest

from sentinel_proxy.config import Alias, Config, Provider, RoutingConfig, Secret, Target, User
from sentinel_proxy.exceptions import Forbidden, InvalidApiKey
from sentinel_proxy.users import Users

KEYED = Provider("p", "http://p.test/v1", Secret("sk-provider"))
ALIASES = {
    "fast": Alias("fast", (Target("p", "m-fast"),)),
    "smart": Alias("smart", (Target("p", "m-smart"),)),
}
ALICE = User("alice", hashlib.sha256(b"sk-alice").digest(), "smart", frozenset({"smart"}))
BOB = User("bob", hashlib.sha256(b"sk-bob").digest())
CONFIG = Config(
    providers=(KEYED,),
    aliases=ALIASES,
    users=(ALICE, BOB),
    routing=RoutingConfig(default_model="fast"),
)


def test_without_users_everyone_is_anonymous() -> None:
    users = Users(Config(providers=(KEYED,)))
    assert users.authenticate(None) is None
    assert users.authenticate(b"Bearer anything") is None


@pytest.mark.parametrize(
    "header",
    [None, b"", b"Bearer", b"Bearer ", b"Basic c2stYWxpY2U=", b"Bearer sk-alicE", b"sk-alice"],
)
def test_a_missing_or_unknown_key_is_401(header: bytes | None) -> None:
    with pytest.raises(InvalidApiKey) as info:
        Users(CONFIG).authenticate(header)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert "sk-alice" not in info.value.message


def test_a_known_key_is_its_user() -> None:
    users = Users(CONFIG)
    assert users.authenticate(b"Bearer sk-alice") is ALICE
    assert users.authenticate(b"bearer  sk-bob ") is BOB


def test_a_request_that_names_no_model_gets_the_tier_else_the_default() -> None:
    users = Users(CONFIG)
    assert users.default_model(ALICE) == "smart"
    assert users.default_model(BOB) == "fast"
    assert users.default_model(None) == "fast"


def test_models_a_user_may_not_use_are_403() -> None:
    Users.check_allowed(ALICE, "smart")
    Users.check_allowed(BOB, "anything")
    Users.check_allowed(None, "anything")
    with pytest.raises(Forbidden) as info:
        Users.check_allowed(ALICE, "fast")
    assert info.value.status_code == 403 and info.value.param == "model"
