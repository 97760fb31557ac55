"""Validation errors raised by the domain types, and the ``--json`` error document."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import msgspec

from .exit_codes import ExitCode

__all__ = [
    "DomainValidationError",
    "DurationError",
    "EmptySelectionError",
    "ErrorBody",
    "ErrorEnvelope",
    "FilesetError",
    "HostNameError",
    "SelectorError",
    "UnknownTransportMethodError",
]


class DomainValidationError(ValueError):
    """A value failed validation; the message names the value and what was expected.

    ``kind`` is the stable, machine-readable error kind used in ``{"error": {...}}``
    documents; ``details`` carries extra string facts (the offending value, ...).
    """

    kind: ClassVar[str] = "validation"
    exit_code: ClassVar[ExitCode] = ExitCode.VALIDATION

    def __init__(self, message: str, *, details: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, str] = dict(details or {})

    def __str__(self) -> str:
        return self.message


class SelectorError(DomainValidationError):
    """A bad ``--host``/``--tag``/``--all`` combination or value."""

    kind = "selector"


class EmptySelectionError(DomainValidationError):
    """The selectors matched no follower (never a silent success)."""

    kind = "emptySelection"


class UnknownTransportMethodError(DomainValidationError):
    """A transport method name other than direct, connect or relay."""

    kind = "unknownTransportMethod"


class FilesetError(DomainValidationError):
    """A malformed fileset descriptor."""

    kind = "fileset"


class DurationError(DomainValidationError):
    """A malformed duration such as ``5x``."""

    kind = "duration"


class HostNameError(DomainValidationError):
    """A follower name outside ``[A-Za-z0-9][A-Za-z0-9_.-]{0,62}``."""

    kind = "hostName"


class ErrorBody(msgspec.Struct, frozen=True, rename="camel"):
    """The body of a ``--json`` error document."""

    kind: str
    message: str
    exit_code: int
    details: dict[str, str] = msgspec.field(default_factory=dict)

    @classmethod
    def from_exception(
        cls,
        exc: BaseException,
        *,
        kind: str | None = None,
        exit_code: int | None = None,
    ) -> ErrorBody:
        """Describe ``exc``; domain errors supply their own kind, exit code and details."""
        if isinstance(exc, DomainValidationError):
            return cls(
                kind=kind or exc.kind,
                message=exc.message,
                exit_code=int(exit_code if exit_code is not None else exc.exit_code),
                details=dict(exc.details),
            )
        return cls(
            kind=kind or type(exc).__name__,
            message=str(exc),
            exit_code=int(exit_code if exit_code is not None else ExitCode.HOSTS_FAILED),
        )


class ErrorEnvelope(msgspec.Struct, frozen=True, rename="camel"):
    """The whole ``--json`` error document: ``{"error": {...}}``."""

    error: ErrorBody

    @classmethod
    def from_exception(
        cls,
        exc: BaseException,
        *,
        kind: str | None = None,
        exit_code: int | None = None,
    ) -> ErrorEnvelope:
        return cls(error=ErrorBody.from_exception(exc, kind=kind, exit_code=exit_code))
