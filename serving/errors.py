"""Request errors with their HTTP status and a short `cause` label for the error counter.

Raised anywhere while handling a request; the app turns each into `{"error": message}` (the
KServe v2 error body that `tritonclient` reads) so a user mistake is never a 500.
"""

from __future__ import annotations


class ServingError(Exception):
    status = 500
    cause = "internal"

    def __init__(self, message: str, cause: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if cause is not None:
            self.cause = cause
        self.headers = headers or {}


class BadRequest(ServingError):
    status = 400
    cause = "bad_request"


class Unauthorized(ServingError):
    status = 401
    cause = "unauthorized"

    def __init__(self, message: str = "missing or wrong bearer token"):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ServingError):
    status = 404
    cause = "not_found"


class PayloadTooLarge(ServingError):
    status = 413
    cause = "too_large"


class UnsupportedMediaType(ServingError):
    status = 415
    cause = "media_type"


class Overloaded(ServingError):
    """The queue is full (or a request waited too long): retry later instead of piling up."""

    status = 503
    cause = "overloaded"

    def __init__(self, message: str, cause: str | None = None):
        super().__init__(message, cause=cause, headers={"Retry-After": "1"})


class InferenceFailed(ServingError):
    status = 500
    cause = "inference"


class SlowClient(ServingError):
    """The client did not send its request body in time: the connection is closed after the answer."""

    status = 408
    cause = "slow_client"


class NonFiniteOutput(ServingError):
    """Finite inputs overflowed inside the model (NaN/inf outputs): the client must change its request."""

    status = 422
    cause = "non_finite"
