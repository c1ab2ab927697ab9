"""One exception tree. Every error carries a one-line user message and a documented exit code.

Exit codes are a contract (DESIGN.md): scripts and the storage initializer branch on them.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INTEGRITY = 4
EXIT_NO_SPACE = 5
EXIT_SOURCE = 6
EXIT_CONFLICT = 7


class ModelcacheError(Exception):
    """Base of every error we expect; anything else is a bug (exit 1)."""

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(ModelcacheError):
    """Bad input: malformed URI, unknown scheme, bad quantity, bad option."""

    exit_code = EXIT_USAGE


class NotFoundError(ModelcacheError):
    """The model is not cached, or the source has no such object."""

    exit_code = EXIT_NOT_FOUND


class IntegrityError(ModelcacheError):
    """Bytes do not match what the source or the manifest says they are."""

    exit_code = EXIT_INTEGRITY


class InsufficientSpaceError(ModelcacheError):
    """The filesystem or the budget cannot hold the model."""

    exit_code = EXIT_NO_SPACE


class SourceError(ModelcacheError):
    """Network, auth or protocol failure talking to the origin (after retries)."""

    exit_code = EXIT_SOURCE


class AuthError(SourceError):
    """Credentials missing or refused. Messages never include the credential."""


class TransientSourceError(SourceError):
    """A failure worth retrying (reset, timeout, 5xx, short body); SourceError once retries run out."""


class SnapshotMismatchError(SourceError):
    """A response does not belong to the snapshot we resolved: the origin lied or changed under us.

    Not retried chunk by chunk (that would mix two versions of a file); the engine starts the model
    again from a fresh snapshot once, then gives up with exit 6.
    """


class ConflictError(ModelcacheError):
    """The operation would break a promise: the model is pinned or in use."""

    exit_code = EXIT_CONFLICT
