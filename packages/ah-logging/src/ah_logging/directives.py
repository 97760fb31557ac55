"""``RUST_LOG``-style log directives as a pure parser and lookup table.

Grammar (whitespace around items and around ``=`` is ignored, level names are
case-insensitive)::

    directives := item ("," item)*
    item       := level | target "=" level
    target     := segment (("::" | ".") segment)*
    segment    := [A-Za-z0-9_-]+
    level      := trace | debug | info | success | warn | warning | error | critical | off

A bare level sets the default; ``target=level`` sets the level for a module and
everything below it (``ah_connectivity`` covers ``ah_connectivity.quic.client``
but not ``ah_connectivity_extra``).  The most specific target wins; when an
item repeats, the last one wins.  ``::`` and ``.`` are the same separator, so
``ah_connectivity::quic=trace`` and ``ah_connectivity.quic=trace`` are equal.

Unlike env_logger, a bare module name (meaning "everything for this module")
and ``/regex`` message filters are rejected with a :class:`DirectiveError`:
``--log-level verbose`` must be a usage error, not a silent no-op.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "LEVELS",
    "OFF",
    "DirectiveError",
    "Directives",
    "ModuleDirective",
    "level_name",
    "parse_directives",
    "parse_level",
]

# Numbers match loguru's built-in levels (and the stdlib's where both exist), so a
# record's ``level.no`` compares directly with a directive's level.
LEVELS: Mapping[str, int] = {
    "trace": 5,
    "debug": 10,
    "info": 20,
    "success": 25,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "critical": 50,
    "off": 1_000_000,
}
OFF = LEVELS["off"]
DEFAULT_LEVEL = LEVELS["info"]

_CANONICAL_NAMES: Mapping[int, str] = {
    number: name for name, number in LEVELS.items() if name != "warn"
}
_LEVEL_CHOICES = "trace, debug, info, success, warning (warn), error, critical, off"
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_SEPARATOR = re.compile(r"::|\.")


class DirectiveError(ValueError):
    """A log directive string that cannot be parsed.

    ``part`` is the offending item, ``text`` the whole string and ``source`` where it
    came from (``"RUST_LOG"``, ``"--log-level"``...) when known.
    """

    def __init__(self, text: str, part: str, reason: str, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}invalid log directive {part!r} in {text!r}: {reason}")
        self.text = text
        self.part = part
        self.reason = reason
        self.source = source


def parse_level(name: str) -> int:
    """The number for a level name (case-insensitive); ``ValueError`` if unknown."""
    try:
        return LEVELS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r} (expected one of {_LEVEL_CHOICES})") from None


def level_name(number: int) -> str:
    """The canonical lower-case name for a level number, or the number itself as text."""
    return _CANONICAL_NAMES.get(number, str(number))


@dataclass(frozen=True, order=True)
class ModuleDirective:
    """``module=level``: ``module`` is dotted (``::`` already turned into ``.``)."""

    module: str
    level: int

    def __str__(self) -> str:
        return f"{self.module}={level_name(self.level)}"


@dataclass(frozen=True)
class Directives:
    """A parsed directive list: a default level plus per-module levels.

    ``default`` is ``None`` when the text had no bare level; :meth:`level_for` then
    falls back to ``info`` and :meth:`overlay` keeps the underlying default.
    """

    default: int | None = None
    modules: tuple[ModuleDirective, ...] = ()
    _lookup: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        lookup = {directive.module: directive.level for directive in self.modules}
        if len(lookup) != len(self.modules):
            raise ValueError(f"duplicate module in log directives: {self.modules!r}")
        # Canonical order so equal filters compare equal however they were written.
        object.__setattr__(self, "modules", tuple(sorted(self.modules)))
        object.__setattr__(self, "_lookup", lookup)

    @property
    def default_level(self) -> int:
        return DEFAULT_LEVEL if self.default is None else self.default

    @property
    def min_level(self) -> int:
        """The lowest level any module may log at (what a sink must let through)."""
        return min([self.default_level, *(d.level for d in self.modules)])

    def level_for(self, module_name: str | None) -> int:
        """The minimum level for records from ``module_name`` (a dotted logger/module name)."""
        if module_name and self._lookup:
            name = module_name
            while True:
                level = self._lookup.get(name)
                if level is not None:
                    return level
                cut = name.rfind(".")
                if cut < 0:
                    break
                name = name[:cut]
        return self.default_level

    def allows(self, module_name: str | None, level: int) -> bool:
        return level >= self.level_for(module_name)

    def overlay(self, over: Directives) -> Directives:
        """``over`` applied on top of ``self``: its default (if any) and its modules win."""
        merged = {d.module: d.level for d in self.modules}
        merged.update((d.module, d.level) for d in over.modules)
        return Directives(
            default=self.default if over.default is None else over.default,
            modules=tuple(ModuleDirective(m, lv) for m, lv in merged.items()),
        )

    def with_quiet_modules(self, modules: Iterable[str], floor: int) -> Directives:
        """Give each of ``modules`` at least ``floor`` unless a directive already covers it.

        A module is covered when a directive names it or one of its parents
        (``uvicorn=debug`` covers ``uvicorn.access``).  Directives for sub-modules
        stay as they are, being more specific.  The floor never makes a module
        more verbose than the default.
        """
        level = max(floor, self.default_level)
        added: list[ModuleDirective] = []
        for module in modules:
            target = _normalise_target(module, module, module, None)
            if not self._covers(target):
                added.append(ModuleDirective(target, level))
        if not added:
            return self
        return Directives(default=self.default, modules=(*self.modules, *added))

    def _covers(self, module: str) -> bool:
        name = module
        while True:
            if name in self._lookup:
                return True
            cut = name.rfind(".")
            if cut < 0:
                return False
            name = name[:cut]

    def __str__(self) -> str:
        parts = [str(d) for d in self.modules]
        if self.default is not None:
            parts.append(level_name(self.default))
        return ",".join(parts)


def _normalise_target(target: str, part: str, text: str, source: str | None) -> str:
    segments = _SEPARATOR.split(target)
    for segment in segments:
        if not _SEGMENT.fullmatch(segment):
            shown = segment if segment else "an empty segment"
            raise DirectiveError(
                text,
                part,
                f"module path {target!r} has {shown!r}; expected names made of letters, "
                "digits, '_' and '-' separated by '::' or '.'",
                source,
            )
    return ".".join(segments)


def parse_directives(text: str, *, source: str | None = None) -> Directives:
    """Parse ``debug``, ``ah_connectivity=debug,info``, ``a::b=trace,warn``...

    Raises :class:`DirectiveError` (a ``ValueError``) naming the bad item; ``source``
    (for example ``"RUST_LOG"``) is put in front of the message.
    """
    default: int | None = None
    modules: dict[str, int] = {}
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise DirectiveError(text, text, "no directive given", source)
    for item in items:
        if not item:
            continue  # tolerate "debug," and "a=debug,,info" like env_logger does
        if "=" in item:
            target, _, level_text = item.partition("=")
            target, level_text = target.strip(), level_text.strip()
            if not target:
                raise DirectiveError(text, item, "missing module before '='", source)
            if "=" in level_text:
                raise DirectiveError(text, item, "more than one '='", source)
            module = _normalise_target(target, item, text, source)
            try:
                level = parse_level(level_text)
            except ValueError as error:
                raise DirectiveError(text, item, str(error), source) from None
            modules.pop(module, None)  # last one wins, also in iteration order
            modules[module] = level
        else:
            try:
                default = parse_level(item)
            except ValueError:
                raise DirectiveError(
                    text,
                    item,
                    f"not a level ({_LEVEL_CHOICES}) nor a module=level pair",
                    source,
                ) from None
    return Directives(
        default=default,
        modules=tuple(ModuleDirective(module, level) for module, level in modules.items()),
    )
