"""Follower selection: ``--host NAME`` (repeatable), ``--tag K=V`` (repeatable, AND), ``--all``."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from .errors import EmptySelectionError, HostNameError, SelectorError
from .hosts import FollowerInfo, validate_host_name
from .patterns import TAG_KEY_PATTERN, TAG_VALUE_PATTERN, HostName, TagKey, TagValue, fullmatch

__all__ = ["Selector", "TagSelector"]

_EXPECTED_TAG = "expected KEY=VALUE (e.g. os=linux)"


def _quote_list(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _count(n: int) -> str:
    return f"{n} follower{'s' if n != 1 else ''} enrolled"


class TagSelector(msgspec.Struct, frozen=True, rename="camel"):
    """One ``KEY=VALUE`` tag requirement."""

    key: TagKey
    value: TagValue

    def __post_init__(self) -> None:
        text = f"{self.key}={self.value}"
        if not fullmatch(TAG_KEY_PATTERN, self.key):
            raise SelectorError(
                f"invalid tag selector {text!r}: key {self.key!r} must start with a letter or "
                f"digit and contain only letters, digits, '_', '.' or '-'; {_EXPECTED_TAG}",
                details={"value": text},
            )
        if not fullmatch(TAG_VALUE_PATTERN, self.value):
            raise SelectorError(
                f"invalid tag selector {text!r}: value {self.value!r} must be non-empty "
                f"without whitespace or commas; {_EXPECTED_TAG}",
                details={"value": text},
            )

    @classmethod
    def parse(cls, text: str) -> TagSelector:
        """Parse ``KEY=VALUE``; the value is everything after the first ``=``."""
        if "=" not in text:
            raise SelectorError(
                f"invalid tag selector {text!r}: missing '='; {_EXPECTED_TAG}",
                details={"value": text},
            )
        key, _, value = text.partition("=")
        if not key:
            raise SelectorError(
                f"invalid tag selector {text!r}: empty key; {_EXPECTED_TAG}",
                details={"value": text},
            )
        if not value:
            raise SelectorError(
                f"invalid tag selector {text!r}: empty value; {_EXPECTED_TAG}",
                details={"value": text},
            )
        return cls(key=key, value=value)

    def matches(self, follower: FollowerInfo) -> bool:
        return follower.effective_tags().get(self.key) == self.value

    def __str__(self) -> str:
        return f"{self.key}={self.value}"


class Selector(msgspec.Struct, frozen=True, rename="camel"):
    """Which followers a command addresses.

    Rules: no selector means every enrolled follower; ``--tag``s AND together; with
    ``--host`` and ``--tag`` both, every named host must match every tag (a mismatch is
    an error, not a silent filter); ``--all`` excludes the other two; an empty result
    is an :class:`EmptySelectionError`.
    """

    hosts: tuple[HostName, ...] = ()
    tags: tuple[TagSelector, ...] = ()
    all: bool = False

    def __post_init__(self) -> None:
        if self.all and (self.hosts or self.tags):
            raise SelectorError(
                f"--all cannot be combined with --host or --tag (got {self._flags()})",
                details={"selector": self._flags()},
            )
        for host in self.hosts:
            try:
                validate_host_name(host)
            except HostNameError as exc:
                raise SelectorError(f"--host: {exc}", details=exc.details) from None

    @classmethod
    def from_cli(cls, hosts: Sequence[str], tags: Sequence[str], all_: bool) -> Selector:
        """Build from the raw values of ``--host``, ``--tag`` and ``--all``.

        Repeated hosts and tags are kept once, in first-seen order.
        """
        parsed_tags = tuple(dict.fromkeys(TagSelector.parse(t) for t in tags))
        return cls(hosts=tuple(dict.fromkeys(hosts)), tags=parsed_tags, all=all_)

    @property
    def selects_everything(self) -> bool:
        return self.all or not (self.hosts or self.tags)

    def _flags(self) -> str:
        parts = [f"--host {h}" for h in self.hosts] + [f"--tag {t}" for t in self.tags]
        if self.all:
            parts.insert(0, "--all")
        return " ".join(parts)

    def describe(self) -> str:
        """The selector as command-line flags, for messages."""
        return self._flags() or "no selector (all followers)"

    def matches(self, follower: FollowerInfo) -> bool:
        """True when ``follower`` is selected (ignoring the host/tag mismatch error)."""
        if self.all:
            return True
        if self.hosts and follower.name not in self.hosts:
            return False
        return all(tag.matches(follower) for tag in self.tags)

    def resolve(self, followers: Sequence[FollowerInfo]) -> list[FollowerInfo]:
        """The selected followers, in the order of ``followers``.

        Raises :class:`SelectorError` for unknown ``--host`` names or a named host that
        does not match a ``--tag``, and :class:`EmptySelectionError` when nothing remains.
        """
        known = [f.name for f in followers]
        if self.hosts:
            unknown = [h for h in self.hosts if h not in known]
            if unknown:
                noun = "host" if len(unknown) == 1 else "hosts"
                listing = ", ".join(known) if known else "none (no followers enrolled)"
                raise SelectorError(
                    f"unknown {noun} {_quote_list(unknown)} (--host); known followers: {listing}",
                    details={"unknown": ",".join(unknown), "known": ",".join(known)},
                )
            by_name = {f.name: f for f in followers}
            mismatches: list[str] = []
            for host in self.hosts:
                have = by_name[host].effective_tags()
                for tag in self.tags:
                    if have.get(tag.key) == tag.value:
                        continue
                    actual = (
                        f"has {tag.key}={have[tag.key]}"
                        if tag.key in have
                        else f"has no tag {tag.key}"
                    )
                    mismatches.append(f"host {host!r} does not match tag {tag} ({actual})")
            if mismatches:
                raise SelectorError("; ".join(mismatches), details={"selector": self._flags()})
        selected = [f for f in followers if self.matches(f)]
        if not selected:
            if not followers:
                raise EmptySelectionError(
                    f"no followers enrolled; nothing to select with {self.describe()}",
                    details={"selector": self._flags(), "enrolled": "0"},
                )
            raise EmptySelectionError(
                f"no follower matches {self.describe()}; {_count(len(followers))}",
                details={"selector": self._flags(), "enrolled": str(len(followers))},
            )
        return selected
