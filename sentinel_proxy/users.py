"""Who is asking and what they may ask for: clients known by the SHA-256 of their key,
each with a tier (the alias used when a request names no model) and the models it may use."""

from __future__ import annotations

import hashlib
import hmac

from sentinel_proxy.config import Config, User
from sentinel_proxy.exceptions import Forbidden, InvalidApiKey

_BEARER = b"bearer "


class Users:
    """Built once from the configuration; without [[users]] everyone is let in anonymously."""

    def __init__(self, config: Config) -> None:
        self._by_digest = {user.key_sha256: user for user in config.users}
        self._default_model = config.routing.default_model
        self.enabled = bool(config.users)

    def authenticate(self, authorization: bytes | None) -> User | None:
        """The user whose key the Authorization header carries; None without users.

        The key is hashed before anything is compared, so a lookup's timing depends on a
        digest an attacker cannot steer, and the final check is hmac.compare_digest."""
        if not self.enabled:
            return None
        if authorization is None or authorization[:7].lower() != _BEARER:
            raise InvalidApiKey("You didn't provide an API key (Authorization: Bearer <key>).")
        digest = hashlib.sha256(authorization[7:].strip()).digest()
        user = self._by_digest.get(digest)
        if user is None or not hmac.compare_digest(user.key_sha256, digest):
            raise InvalidApiKey("Incorrect API key provided.")
        return user

    def default_model(self, user: User | None) -> str | None:
        """The model a request that names none is routed by: the user's tier, else the
        configured default."""
        if user is not None and user.tier is not None:
            return user.tier
        return self._default_model

    @staticmethod
    def check_allowed(user: User | None, model: str | None) -> None:
        if user is None or user.models is None or model is None or model in user.models:
            return
        raise Forbidden(f"You may not use the model {model!r}.", param="model")
