"""Exceptions raised by the Beluga store.

Every message names what was wrong and what was expected, so that a scenario
log is enough to act on it without reading the code.
"""
from __future__ import annotations


class BelugaError(Exception):
    """Base class of every error the store raises on purpose."""


class NotAPoolError(BelugaError):
    """The path is not a Beluga pool (no superblock magic); nothing was written."""


class LayoutVersionError(BelugaError):
    """The pool was formatted with a layout version this code does not speak."""


class CorruptPoolError(BelugaError):
    """The pool has a Beluga superblock but it (or its geometry) is damaged."""


class PoolTooSmallError(BelugaError):
    """The pool's bytes cannot hold the requested or recorded geometry."""


class InvalidKeyError(BelugaError, ValueError):
    """A key is not a 32-byte block hash."""


class BlockTooLargeError(BelugaError, ValueError):
    """A block does not fit in one segment."""


class PoolFullError(BelugaError):
    """No space could be found or evicted (every candidate is leased or being written)."""


class ServiceUnavailableError(BelugaError):
    """The metadata service did not answer within the client's timeout."""


class ServiceBusyError(BelugaError):
    """Another metadata service is alive on this pool."""


class SessionExpiredError(BelugaError):
    """The service no longer knows this client (heartbeat timed out or slot reclaimed)."""


class RequestRejectedError(BelugaError):
    """The service refused a request (bad offsets, foreign segment, stale reservation, ...)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(BelugaError):
    """A request or response on the wire is malformed."""
