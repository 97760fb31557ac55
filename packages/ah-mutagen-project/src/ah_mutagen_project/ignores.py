"""Sync ignores: the effective list and its translation for rsync and Mutagen.

Every API of this package that takes ``ignores`` means the ``sync-ignores`` setting (``None``:
the documented default ``node_modules``, ``.venv``, ``target``, ``build``; a repo override
replaces the list). VCS metadata (``.git``, ``.hg``, ``.svn``, ``.jj``) is always added.
The matching rule is documented in :mod:`ah_mutagen_project.digest_script`: a pattern without
``/`` matches a name at any depth, a pattern with ``/`` is anchored to the root, a trailing
``/`` means directories only, ``*``/``?``/``[seq]`` globs never cross ``/``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ah_domain_types.config_schema import default_config
from ah_mutagen_project.digest_script import VCS_IGNORES, IgnorePatternError, IgnoreRules

__all__ = [
    "DEFAULT_SYNC_IGNORES",
    "VCS_IGNORES",
    "IgnorePatternError",
    "effective_ignores",
    "is_anchored",
    "mutagen_ignore_paths",
    "rsync_exclude_patterns",
    "user_ignores",
]

DEFAULT_SYNC_IGNORES: tuple[str, ...] = tuple(default_config().sync_ignores or ())
"""The ``sync-ignores`` default from the configuration schema."""


def user_ignores(sync_ignores: Sequence[str] | None) -> tuple[str, ...]:
    """``sync_ignores`` (``None``: the default), validated, duplicates dropped, VCS not added.

    Raises:
        IgnorePatternError: naming the first pattern outside the supported syntax.
    """
    if isinstance(sync_ignores, str):
        raise IgnorePatternError(
            f"sync-ignores must be a list of patterns, got the single string {sync_ignores!r}"
        )
    patterns = DEFAULT_SYNC_IGNORES if sync_ignores is None else tuple(sync_ignores)
    IgnoreRules(patterns, vcs=False)  # validates
    return tuple(dict.fromkeys(patterns))


def effective_ignores(sync_ignores: Sequence[str] | None) -> tuple[str, ...]:
    """VCS metadata names followed by :func:`user_ignores`, without duplicates."""
    return tuple(dict.fromkeys((*VCS_IGNORES, *user_ignores(sync_ignores))))


def is_anchored(pattern: str) -> bool:
    """True if ``pattern`` matches whole paths from the root (it contains a ``/``)."""
    return "/" in pattern.rstrip("/") or pattern.startswith("/")


def _with_leading_slash(pattern: str) -> str:
    return pattern if not is_anchored(pattern) else "/" + pattern.lstrip("/")


def rsync_exclude_patterns(sync_ignores: Sequence[str] | None) -> list[str]:
    """``--exclude`` values meaning exactly :func:`effective_ignores`.

    rsync matches a slash-free pattern against the last component at any depth, and a pattern
    with a leading ``/`` against the path from the transfer root; a trailing ``/`` is
    directories only. So bare names pass through and anchored patterns get a leading ``/``
    (without it rsync would match ``a/b`` at any depth).
    """
    return [_with_leading_slash(p) for p in effective_ignores(sync_ignores)]


def mutagen_ignore_paths(sync_ignores: Sequence[str] | None) -> list[str]:
    """``ignore.paths`` entries for ``mutagen.yml`` (Mutagen's default ignore syntax).

    Mutagen matches slash-free patterns against the base name and slashed ones against the
    whole path from the root, trailing ``/`` for directories; anchored ones are written with
    the explicit leading ``/``. VCS names are included (``ignore.vcs: true`` covers ``.git``,
    ``.hg``, ``.svn`` but not ``.jj``).
    """
    return [_with_leading_slash(p) for p in effective_ignores(sync_ignores)]
