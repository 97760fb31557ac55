"""``slurp``, the pure part: which remote files a fileset selects, where each lands on the
leader, whether a transfer can be trusted, and the result documents.

The I/O shell (SFTP walk, remote checksums, transfers) is :mod:`.slurp_io`.

Globs (``include`` / ``exclude`` of a :class:`~ah_domain_types.FilesetSpec`) are relative to
the follower's workspace and always use ``/``:

* ``*`` matches any run of characters within one path component (dot-files included),
  ``?`` one character, ``[seq]`` / ``[!seq]`` a character class;
* ``**`` as a whole component matches zero or more directories (``logs/**/*.txt`` matches
  ``logs/a.txt`` and ``logs/x/y/a.txt``); elsewhere it is an error;
* an ``exclude`` glob that matches a file *or any of its parent directories* excludes it
  (``exclude = ["out/tmp"]`` drops ``out/tmp/`` and everything below it); an exclude
  without ``/`` matches a name at any depth, like ``sync-ignores`` (``exclude = ["*.tmp"]``
  drops every ``.tmp`` file, ``exclude = ["cache"]`` every ``cache`` directory);
* absolute globs and ``..`` components are errors (a fileset never leaves the workspace).

Layout: the files of a fileset that exactly one host provided go to ``<dest>/<path>``;
when several hosts provided files they go to ``<dest>/<fileset>/<host>/<path>``. Either way
the metadata document ``<dest>/<fileset>.slurp.json`` lists every file fetched.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

import msgspec

from ah_domain_types import ExitCode, FilesetError, FilesetSpec

__all__ = [
    "FilesetMatcher",
    "FilesetOutcome",
    "RemoteFileState",
    "SlurpEnvelope",
    "SlurpHostResult",
    "SlurpedFile",
    "TransferVerdict",
    "answered_layout",
    "check_transfer",
    "metadata_path",
]

_GLOB_CHARS = re.compile(r"[*?\[]")


def _check_glob(glob: str, *, fileset: str, key: str) -> tuple[str, ...]:
    text = glob.strip()
    while text.startswith("./"):
        text = text[2:]
    if text.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", text) or "\\" in text:
        raise FilesetError(
            f"fileset {fileset!r}: {key} glob {glob!r} must be relative to the workspace and "
            "use '/' (no absolute paths, drive letters or backslashes)",
            details={"fileset": fileset, "glob": glob},
        )
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if not parts:
        raise FilesetError(
            f"fileset {fileset!r}: {key} glob {glob!r} selects nothing (empty path)",
            details={"fileset": fileset, "glob": glob},
        )
    for part in parts:
        if part == "..":
            raise FilesetError(
                f"fileset {fileset!r}: {key} glob {glob!r} has a '..' component; filesets "
                "stay inside the workspace",
                details={"fileset": fileset, "glob": glob},
            )
        if "**" in part and part != "**":
            raise FilesetError(
                f"fileset {fileset!r}: {key} glob {glob!r}: '**' must be a whole path "
                "component (like 'a/**/b'), not part of one",
                details={"fileset": fileset, "glob": glob},
            )
    return parts


def _component_regex(part: str) -> re.Pattern[str]:
    # fnmatch.translate lets '*' cross '/', which cannot occur inside one component anyway.
    return re.compile(fnmatch.translate(part), re.DOTALL)


class _Glob:
    """One glob as a list of components; ``**`` matches zero or more components."""

    def __init__(self, parts: tuple[str, ...]) -> None:
        self.parts = parts
        self._regexes = [None if p == "**" else _component_regex(p) for p in parts]

    def matches(self, path: Sequence[str]) -> bool:
        return self._match(0, tuple(path), 0)

    def _match(self, i: int, path: tuple[str, ...], j: int) -> bool:
        while i < len(self.parts):
            regex = self._regexes[i]
            if regex is None:
                # '**': try every split (zero or more whole components).
                return any(self._match(i + 1, path, k) for k in range(j, len(path) + 1))
            if j >= len(path) or not regex.fullmatch(path[j]):
                return False
            i, j = i + 1, j + 1
        return j == len(path)

    def may_contain(self, directory: Sequence[str]) -> bool:
        """Whether a file below ``directory`` could match (used to prune the walk)."""
        for index, name in enumerate(directory):
            if index >= len(self.parts):
                return False
            regex = self._regexes[index]
            if regex is None:
                return True
            if not regex.fullmatch(name):
                return False
        return len(directory) < len(self.parts)

    def static_prefix(self) -> tuple[str, ...]:
        """The leading directory components without glob characters (where a walk starts)."""
        prefix: list[str] = []
        for part in self.parts[:-1]:
            if part == "**" or _GLOB_CHARS.search(part):
                break
            prefix.append(part)
        return tuple(prefix)


class FilesetMatcher:
    """Decides, for workspace-relative paths (``a/b/c.txt``), what a fileset selects."""

    def __init__(self, spec: FilesetSpec) -> None:
        self.spec = spec
        self._include = [
            _Glob(_check_glob(g, fileset=spec.name, key="include")) for g in spec.include
        ]
        self._exclude = [
            _Glob(_check_glob(g, fileset=spec.name, key="exclude")) for g in spec.exclude
        ]

    @staticmethod
    def _parts(path: str | Sequence[str]) -> tuple[str, ...]:
        if isinstance(path, str):
            return tuple(p for p in path.split("/") if p)
        return tuple(path)

    def excluded(self, path: str | Sequence[str]) -> bool:
        """True when an exclude glob matches ``path`` or one of its parent directories
        (a glob without ``/``: any component of ``path``)."""
        parts = self._parts(path)
        for glob in self._exclude:
            if len(glob.parts) == 1 and glob.parts[0] != "**":
                if any(glob.matches((name,)) for name in parts):
                    return True
            elif any(glob.matches(parts[:n]) for n in range(1, len(parts) + 1)):
                return True
        return False

    def matches(self, path: str | Sequence[str]) -> bool:
        """True when ``path`` (a file) is selected: some include matches, no exclude does."""
        parts = self._parts(path)
        return any(g.matches(parts) for g in self._include) and not self.excluded(parts)

    def descend(self, directory: str | Sequence[str]) -> bool:
        """Whether a walk should enter ``directory`` (some file below it may be selected)."""
        parts = self._parts(directory)
        if self.excluded(parts):
            return False
        return any(g.may_contain(parts) for g in self._include)

    def walk_roots(self) -> list[tuple[str, ...]]:
        """Directories to start walking from: the static prefixes of the include globs,
        without those below another root."""
        prefixes = sorted({g.static_prefix() for g in self._include}, key=len)
        roots: list[tuple[str, ...]] = []
        for prefix in prefixes:
            if not any(prefix[: len(root)] == root for root in roots):
                roots.append(prefix)
        return roots


# --------------------------------------------------------------------------- verification


class RemoteFileState(msgspec.Struct, frozen=True, rename="camel"):
    """A file as the follower saw it when hashing (or why it could not)."""

    path: str
    size: int | None = None
    mtime: float | None = None
    sha256: str | None = None
    error: str | None = None


class TransferVerdict(msgspec.Struct, frozen=True):
    ok: bool
    reason: str | None = None


def check_transfer(
    host: str,
    path: str,
    before: RemoteFileState | None,
    fetched_sha256: str | None,
    after: RemoteFileState | None,
) -> TransferVerdict:
    """Trust a fetched copy only when the follower's sha256 before the transfer, the
    copy's own sha256 and the follower's sha256 after the transfer are all the same."""
    where = f"{host}:{path}"
    for label, state in (("before", before), ("after", after)):
        if state is None:
            return TransferVerdict(
                False, f"{where}: no checksum from the follower {label} the transfer"
            )
        if state.error is not None or state.sha256 is None:
            return TransferVerdict(
                False,
                f"{where}: the follower could not hash it {label} the transfer: {state.error}",
            )
    assert before is not None and after is not None
    if fetched_sha256 is None:
        return TransferVerdict(False, f"{where}: the transfer did not complete")
    if before.sha256 == fetched_sha256 == after.sha256:
        return TransferVerdict(True)
    return TransferVerdict(
        False,
        f"checksum mismatch for {where}: sha256 before the transfer {before.sha256}, of the "
        f"fetched copy {fetched_sha256}, after the transfer {after.sha256} (the file changed "
        "while it was copied?)",
    )


# --------------------------------------------------------------------------- layout


def answered_layout(fileset: str, answered: Sequence[str], host: str, path: str) -> PurePosixPath:
    """Where ``host``'s ``path`` goes below the fileset's destination directory."""
    relative = PurePosixPath(*[p for p in path.split("/") if p])
    if len(answered) == 1:
        return relative
    return PurePosixPath(fileset, host) / relative


def metadata_path(fileset: str) -> str:
    """The metadata document's name, in the fileset's destination directory."""
    return f"{fileset}.slurp.json"


# --------------------------------------------------------------------------- documents


class SlurpedFile(msgspec.Struct, frozen=True, rename="camel"):
    """One verified file on the leader."""

    host: str
    path: str
    """Workspace-relative path on the follower (``/``-separated)."""
    local_path: str
    size: int
    mtime: float
    """Modification time on the follower (seconds since the epoch)."""
    sha256: str


class SlurpHostResult(msgspec.Struct, frozen=True, rename="camel"):
    """One host's part in one fileset."""

    host: str
    state: str
    """``ok``, ``empty`` (no matching file), ``failed`` or ``unreachable``."""
    files: int = 0
    bytes: int = 0
    errors: list[str] = []


class FilesetOutcome(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    required: bool
    dest: str
    """The fileset's destination directory on the leader."""
    answered: list[str]
    """Hosts that provided at least one matching file."""
    hosts: list[SlurpHostResult]
    files: list[SlurpedFile]
    metadata_path: str | None
    errors: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.errors and all(h.state in ("ok", "empty") for h in self.hosts)


class SlurpEnvelope(msgspec.Struct, frozen=True, rename="camel"):
    """The ``--json`` document of ``ah-fleetctl slurp``."""

    filesets: list[FilesetOutcome]
    unreachable: dict[str, str] = {}
    """Selected hosts that could not be reached, with the reason."""

    @property
    def exit_code(self) -> ExitCode:
        ok = not self.unreachable and all(f.ok for f in self.filesets)
        return ExitCode.OK if ok else ExitCode.HOSTS_FAILED

    def error_lines(self) -> Iterable[str]:
        for host, reason in self.unreachable.items():
            yield f"{host}: unreachable: {reason}"
        for fileset in self.filesets:
            yield from fileset.errors
            for host_result in fileset.hosts:
                yield from host_result.errors
