"""
The errors sentinel-proxy raises, translated from lower libraries at each seam.

    SentinelError
    ├── ConfigError              start-up stops: one line, exit code 2
    └── ProxyError               answered to the client in the OpenAI error shape
        ├── InvalidRequest       400
        ├── RequestTooLarge      413
        ├── URITooLong           414
        ├── HeadersTooLarge      431
        ├── Unauthorized         401 (debug endpoints)
        │   └── InvalidApiKey    401 (a client key no user holds)
        ├── Forbidden            403 (a model the user may not use)
        ├── NotFound             404
        ├── MethodNotAllowed     405
        ├── RequestTimeout       408 (head or body too slow; the connection closes)
        ├── StoreUnavailable     503 + Retry-After (session store down, slow or circuit open)
        ├── TargetUnavailable    503 + Retry-After (a pinned target failed; its alias says "error")
        ├── UpstreamPoolExhausted  503 + Retry-After (no free upstream connection in time)
        ├── Overloaded           503 + Retry-After (past server.max_connections)
        ├── ConfigurationChanged 503 + Retry-After (a reload changed the providers under it)
        └── UpstreamError
            ├── UpstreamUnavailable  502 (refused, reset or broken before the response)
            ├── UpstreamBadResponse  502 (not valid HTTP: status, malformed headers)
            └── UpstreamTimeout      504

`redis.*` never passes the session store and `httpx.*` never passes the upstream client:
both are re-raised as the errors above with `raise ... from exc`.
"""

from __future__ import annotations


class SentinelError(Exception):
    """Base class of every error of sentinel-proxy."""


class ConfigError(SentinelError):
    """The configuration is unusable: `key` names where, the message says what."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class ProxyError(SentinelError):
    """An error answered to the client; the class fixes status, type and code."""

    status_code = 500
    error_type = "server_error"
    code = "internal_error"
    # Whether the answer carries Retry-After: a condition that passes by itself.
    retry_after = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ProxyError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class RequestTooLarge(ProxyError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class URITooLong(ProxyError):
    status_code = 414
    error_type = "invalid_request_error"
    code = "uri_too_long"


class HeadersTooLarge(ProxyError):
    status_code = 431
    error_type = "invalid_request_error"
    code = "request_headers_too_large"


class Unauthorized(ProxyError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "unauthorized"


class InvalidApiKey(Unauthorized):
    code = "invalid_api_key"


class Forbidden(ProxyError):
    status_code = 403
    error_type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(ProxyError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(ProxyError):
    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class StoreUnavailable(ProxyError):
    status_code = 503
    retry_after = True
    code = "session_store_unavailable"


class UpstreamPoolExhausted(ProxyError):
    """Every upstream connection stayed busy for the whole pool timeout. Not an
    UpstreamError: no upstream failed, and another target shares the same pool."""

    status_code = 503
    code = "upstream_pool_exhausted"
    retry_after = True


class Overloaded(ProxyError):
    status_code = 503
    code = "server_overloaded"
    retry_after = True


class TargetUnavailable(ProxyError):
    status_code = 503
    code = "target_unavailable"
    retry_after = True


class ConfigurationChanged(ProxyError):
    status_code = 503
    code = "configuration_changed"
    retry_after = True


class UpstreamError(ProxyError):
    status_code = 502
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamBadResponse(UpstreamError):
    code = "upstream_bad_response"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"
