"""The one error every configuration problem raises."""

from __future__ import annotations

from typing import ClassVar

from ah_domain_types import DomainValidationError, ExitCode

__all__ = ["ConfigError"]


class ConfigError(DomainValidationError):
    """Configuration that cannot be used: unreadable or malformed TOML, a key the schema does
    not know, a value of the wrong type, a bad ``AH_*`` variable.

    The message always names where the problem is (``source``: a file, an environment
    variable or a ``--flag``), the dotted ``key`` when there is one, and what was
    ``expected``. ``line``/``column`` locate TOML syntax errors (1-based).
    """

    kind: ClassVar[str] = "configuration"
    exit_code: ClassVar[ExitCode] = ExitCode.CONFIGURATION

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        key: str | None = None,
        expected: str | None = None,
        line: int | None = None,
        column: int | None = None,
        layer: str | None = None,
    ) -> None:
        details = {
            name: str(value)
            for name, value in (
                ("source", source),
                ("key", key),
                ("expected", expected),
                ("line", line),
                ("column", column),
                ("layer", layer),
            )
            if value is not None
        }
        super().__init__(message, details=details)
        self.source = source
        self.key = key
        self.expected = expected
        self.line = line
        self.column = column
        self.layer = layer
