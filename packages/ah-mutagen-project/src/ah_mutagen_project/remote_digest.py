"""The follower side of the fence: a shell command that digests the follower's tree, and the
parser for what it prints.

The command ships ``digest_script.py`` (package data, stdlib only) inside the command line, so
a follower needs nothing but ``python3`` — not ``ah-tree-digest``, not any ah-* package:

* ``heredoc`` (default): ``python3 - --root DIR ... <<'AH_TREE_DIGEST_EOF'`` + the script —
  readable, for POSIX login shells (bash, zsh, sh).
* ``inline-posix`` / ``inline-powershell``: ``python3 -c "<loader>" <payload> --root DIR ...``
  where the payload is the script zlib-compressed and base64-encoded and the loader contains
  no quotes, so the command survives any shell; only the arguments are quoted, for a POSIX
  shell or for PowerShell respectively (Windows followers run PowerShell).
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import zlib
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from typing import Literal

import msgspec

from ah_mutagen_project.ignores import user_ignores
from ah_mutagen_project.snapshot import Manifest

__all__ = [
    "HEREDOC_MARKER",
    "RemoteDigest",
    "RemoteDigestError",
    "digest_script_source",
    "parse_digest_output",
    "remote_digest_command",
]

HEREDOC_MARKER = "AH_TREE_DIGEST_EOF"
DigestCommandStyle = Literal["heredoc", "inline-posix", "inline-powershell"]
_ID_RE = re.compile(r"snap-[0-9a-f]{32}")
# No quotes inside, so no shell (POSIX, PowerShell, cmd) needs them escaped.
_INLINE_LOADER = "import sys,zlib,base64;exec(zlib.decompress(base64.b64decode(sys.argv.pop(1))))"


class RemoteDigestError(RuntimeError):
    """A follower's digest output could not be used (the message quotes it)."""


class RemoteDigest(msgspec.Struct, frozen=True):
    """A follower's answer: its tree's content id, and the manifest when it was asked for."""

    id: str
    manifest: Manifest | None = None
    exec_bits: bool = True


@cache
def digest_script_source() -> str:
    """The source of ``digest_script.py`` as shipped in this package."""
    return resources.files("ah_mutagen_project").joinpath("digest_script.py").read_text("utf-8")


@cache
def _inline_payload() -> str:
    """The script zlib-compressed and base64-encoded, for the inline styles (once)."""
    return base64.b64encode(zlib.compress(digest_script_source().encode("utf-8"), 9)).decode(
        "ascii"
    )


_POWERSHELL_SAFE = re.compile(r"[A-Za-z0-9_./:\\=+-]+")


def _powershell_quote(word: str) -> str:
    """A PowerShell single-quoted literal (``'`` doubled), unless the word needs none."""
    if _POWERSHELL_SAFE.fullmatch(word):
        return word
    return "'" + word.replace("'", "''") + "'"


def remote_digest_command(
    root: str,
    ignores: Sequence[str] | None = None,
    *,
    manifest: bool = False,
    exec_bits: bool = True,
    python: str = "python3",
    style: DigestCommandStyle = "heredoc",
    cache: bool = False,
    isolated: bool = False,
    apply: bool = False,
    serve: bool = False,
    inotify: bool = True,
) -> str:
    """A command line that prints the digest of ``root`` on a follower (see module doc).

    ``ignores`` are the sync-ignores (``None``: the default; VCS metadata is implied).
    ``manifest=True`` asks for the JSON document with the manifest (``--json``).
    ``cache=True`` lets the follower reuse file hashes from its own stat cache (``--cache
    auto``; see ``digest_script``): a digest then reads only files that changed.
    ``isolated=True`` starts Python with ``-I -S`` (no site, no user or environment paths:
    the script needs only the standard library, and a fence pays the start-up per host).
    ``apply=True`` first applies the change set the command reads on its standard input
    (``--apply -``, see ``digest_script.apply_changes``); the heredoc style, whose standard
    input is the script, cannot.
    ``serve=True`` starts a warm session instead (``--serve``: framed requests on standard
    input, see :mod:`ah_mutagen_project.digest_session`; inline styles only);
    ``inotify=False`` makes its every digest a full stat walk (``--no-inotify``).
    """
    args = ["--root", root]
    for pattern in user_ignores(ignores):
        args += ["--ignore", pattern]
    if manifest:
        args.append("--json")
    if not exec_bits:
        args.append("--no-exec-bit")
    if cache:
        args += ["--cache", "auto"]
    if apply:
        if style == "heredoc":
            raise ValueError("a digest that applies a change set needs an inline style")
        args += ["--apply", "-"]
    if serve:
        if style == "heredoc" or apply or manifest:
            raise ValueError("a digest session needs an inline style, and no --apply or --json")
        args.append("--serve")
        if not inotify:
            args.append("--no-inotify")
    flags = ["-I", "-S"] if isolated else []
    source = digest_script_source()
    if style == "heredoc":
        if HEREDOC_MARKER in source:
            raise AssertionError(f"digest_script.py contains the heredoc marker {HEREDOC_MARKER}")
        return (
            f"{shlex.join([python, *flags, '-', *args])} <<'{HEREDOC_MARKER}'\n"
            f"{source.rstrip()}\n{HEREDOC_MARKER}\n"
        )
    payload = _inline_payload()
    quote: Callable[[str], str]
    if style == "inline-posix":
        quote = shlex.quote
    elif style == "inline-powershell":
        quote = _powershell_quote
    else:
        raise ValueError(
            f"unknown digest command style {style!r}; expected heredoc, inline-posix or "
            "inline-powershell"
        )
    program = quote(python)
    if style == "inline-powershell" and program != python:
        program = "& " + program  # a quoted first word is a string, not a command, there
    return " ".join([program, *flags, "-c", f'"{_INLINE_LOADER}"', payload, *map(quote, args)])


def _last_line(stdout: bytes) -> str:
    lines = [line.strip() for line in stdout.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


def parse_digest_output(stdout: bytes, *, manifest: bool, where: str = "follower") -> RemoteDigest:
    """Parse the digest command's stdout (its last non-empty line, so a chatty login shell
    cannot break it).

    Raises:
        RemoteDigestError: the output is not a digest, or reports an error, or its manifest
            does not hash to the id it claims.
    """
    line = _last_line(stdout)
    if not manifest:
        if not _ID_RE.fullmatch(line):
            raise RemoteDigestError(
                f"{where}: digest printed {line[:200]!r}; expected a content id snap-<32 hex>"
            )
        return RemoteDigest(id=line)
    try:
        document = json.loads(line)
    except ValueError:
        raise RemoteDigestError(
            f"{where}: digest --json printed {line[:200]!r}; expected one JSON document"
        ) from None
    if not isinstance(document, dict):
        raise RemoteDigestError(f"{where}: digest --json printed {line[:200]!r}")
    error = document.get("error")
    if isinstance(error, dict):
        raise RemoteDigestError(f"{where}: digest failed: {error.get('message', error)}")
    tree_id = document.get("id")
    rows = document.get("entries")
    exec_bits = document.get("execBits", True)
    if not isinstance(tree_id, str) or not _ID_RE.fullmatch(tree_id) or not isinstance(rows, list):
        raise RemoteDigestError(
            f"{where}: digest --json lacks a valid 'id' and 'entries': {line[:200]!r}"
        )
    try:
        parsed = Manifest.from_tuples(rows)
    except ValueError as exc:
        raise RemoteDigestError(f"{where}: bad manifest in digest output: {exc}") from None
    if parsed.content_id(exec_bits=bool(exec_bits)) != tree_id:
        raise RemoteDigestError(
            f"{where}: digest manifest hashes to {parsed.content_id(exec_bits=bool(exec_bits))} "
            f"but claims {tree_id} (a different digest algorithm version?)"
        )
    return RemoteDigest(id=tree_id, manifest=parsed, exec_bits=bool(exec_bits))
