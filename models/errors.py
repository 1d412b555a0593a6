"""One error hierarchy for the CLI and the service.

Every error a user can cause or fix is an :class:`ImgsimError` whose message says what to
do. The CLI prints it as one line (exit 2); the service answers with its ``status`` (and
``headers``) through one exception handler. An error that is not one of these is a bug.
"""

from __future__ import annotations

from typing import ClassVar


class ImgsimError(Exception):
    """A user-facing error; subclasses say which HTTP status the service answers with.

    The base class is for failures of the command line (a missing dataset, a model
    directory in the wrong state) that a service request cannot cause: 500 if one does.
    """

    status: int = 500
    headers: ClassVar[dict[str, str]] = {}

    @property
    def detail(self) -> str:
        return str(self)


class BadInput(ImgsimError):
    """A request or argument that cannot be processed as given (corrupt image, bad parameter)."""

    status = 422


class NotFound(ImgsimError):
    """An unknown model, item id or file."""

    status = 404


class Conflict(ImgsimError):
    """The request does not fit the model or index as it is (e.g. classify on a model without a classifier)."""

    status = 409


class Gone(ImgsimError):
    """The item is known but its image can no longer be read from its source."""

    status = 410


class UnsupportedType(ImgsimError):
    """Not an image, or an image format or content type the service does not take."""

    status = 415


class TooLarge(ImgsimError):
    """An upload over the byte limit or an image over the pixel limit."""

    status = 413


class Unauthorized(ImgsimError):
    """An admin operation without the API key."""

    status = 401
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "ApiKey"}


class Forbidden(ImgsimError):
    """An admin operation with a wrong API key."""

    status = 403


class Busy(ImgsimError):
    """The model's queue is full: retry after ``Retry-After`` seconds."""

    status = 503
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class NotReady(ImgsimError):
    """The service has no model loaded (yet)."""

    status = 503


UNREADABLE_STATUS: dict[str, type[ImgsimError]] = {
    "empty": BadInput,
    "corrupt": BadInput,
    "not_an_image": UnsupportedType,
    "unsupported_format": UnsupportedType,
    "too_large": TooLarge,
}


class UnreadableImage(ImgsimError):
    """An image that cannot be used; ``reason`` (a key of UNREADABLE_STATUS) counts skips by cause."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in UNREADABLE_STATUS:
            raise ValueError(f"unknown reason {reason!r}; expected one of {tuple(UNREADABLE_STATUS)}")
        self.reason = reason
        self.reason_detail = detail
        self.status = UNREADABLE_STATUS[reason].status
        message = f"unreadable image ({reason})"
        super().__init__(f"{message}: {detail}" if detail else message)
