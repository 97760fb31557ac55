"""``ah-fleetctl slurp``: fetch filesets (build outputs, logs, reports) back from followers.

The filesets come from config (``--fileset NAME`` picks a ``[[fileset]]`` table), from the
command line (``--fileset-data 'name=logs&include=*.log'``, URL-encoded) or from a file
(``--fileset-file PATH``: TOML or, for ``.json``, JSON; one fileset, or several as
``[[fileset]]`` tables / a JSON list). The work itself is
:func:`ah_run_everywhere.slurp_io.slurp` over the selection's SSH transports.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ah_config import AhCommand, CliError, echo_json
from ah_domain_types import ExitCode, FilesetError, FilesetSpec, FollowerStatus

from ..context import FleetContext
from ..options import common_options, selector_from_options, selector_options
from .fleet import select_followers

if TYPE_CHECKING:
    from ah_run_everywhere.slurp import SlurpEnvelope

__all__ = ["load_fileset_file", "resolve_filesets", "slurp_command"]

_DEFAULT_TRANSFERS = 16


def load_fileset_file(path: Path) -> list[FilesetSpec]:
    """Filesets from a TOML or JSON file (see the module docstring); errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(
            ExitCode.VALIDATION,
            f"--fileset-file {path}: cannot read it: {exc.strerror or exc}",
            kind="validation",
            details={"path": str(path)},
        ) from None
    try:
        data: Any
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise FilesetError(f"invalid JSON: {exc}") from None
            tables = data if isinstance(data, list) else [data]
        else:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise FilesetError(f"invalid TOML: {exc}") from None
            tables = data["fileset"] if isinstance(data.get("fileset"), list) else [data]
        if not tables:
            raise FilesetError("no fileset in it")
        return [FilesetSpec.from_mapping(t) for t in tables]
    except FilesetError as exc:
        raise FilesetError(f"--fileset-file {path}: {exc}", details=exc.details) from None


def resolve_filesets(
    app: FleetContext,
    names: Sequence[str],
    data: Sequence[str],
    files: Sequence[Path],
) -> list[FilesetSpec]:
    """Every requested fileset; unknown names and duplicates are validation errors (7)."""
    configured = {f.name: f for f in app.config.typed.filesets()}
    specs: list[FilesetSpec] = []
    for name in names:
        spec = configured.get(name)
        if spec is None:
            known = ", ".join(sorted(configured)) or "none ([[fileset]] in the config)"
            raise CliError(
                ExitCode.VALIDATION,
                f"--fileset {name!r}: no such fileset in the configuration; configured: {known}",
                kind="validation",
                details={"fileset": name},
            )
        specs.append(spec)
    for text in data:
        try:
            specs.append(FilesetSpec.from_urlencoded(text))
        except FilesetError as exc:
            raise FilesetError(f"--fileset-data: {exc}", details=exc.details) from None
    for path in files:
        specs.extend(load_fileset_file(path))
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise CliError(
                ExitCode.VALIDATION,
                f"fileset {spec.name!r} is requested more than once",
                kind="validation",
                details={"fileset": spec.name},
            )
        seen.add(spec.name)
    return specs


async def _slurp(
    app: FleetContext,
    selected: Sequence[FollowerStatus],
    specs: Sequence[FilesetSpec],
    dest: Path,
    concurrency: int,
) -> SlurpEnvelope:
    from ah_run_everywhere.slurp import FilesetMatcher
    from ah_run_everywhere.slurp_io import SlurpTarget, slurp

    from ..dataplane import open_links

    for spec in specs:
        FilesetMatcher(spec)  # bad globs are exit 7 before anything connects
    links = await open_links(app, selected)
    try:
        targets = [
            SlurpTarget(name=n, os=links.os_of(n), workspace=links.workspace(n))
            for n in links.names
        ]
        return await slurp(
            specs,
            targets,
            transport_for=links.transport,
            relink=links.relink,
            unreachable={n: e.reason for n, e in links.unreachable.items()},
            dest=dest,
            concurrency=concurrency,
        )
    finally:
        await links.close()


@click.command(
    "slurp", cls=AhCommand, short_help="Fetch filesets back from the selected followers."
)
@selector_options
@click.option(
    "--fileset",
    "fileset_names",
    multiple=True,
    metavar="NAME",
    help="A [[fileset]] from the configuration (repeatable).",
)
@click.option(
    "--fileset-data",
    "fileset_data",
    multiple=True,
    metavar="DATA",
    help="A fileset, URL-encoded: name=N&include=GLOB[&include=...][&exclude=GLOB...]"
    "[&required=yes][&dest=DIR] (repeatable).",
)
@click.option(
    "--fileset-file",
    "fileset_files",
    multiple=True,
    metavar="PATH",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Filesets from a TOML or JSON file (repeatable).",
)
@click.option(
    "--dest",
    "dest",
    default=None,
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to put the files (default: the current directory); a fileset's own dest "
    "is relative to it.",
)
@common_options
@click.pass_context
def slurp_command(
    ctx: click.Context,
    /,
    hosts: tuple[str, ...],
    tags: tuple[str, ...],
    all_: bool,
    fileset_names: tuple[str, ...],
    fileset_data: tuple[str, ...],
    fileset_files: tuple[Path, ...],
    dest: Path | None,
    **_: object,
) -> int:
    """Fetch the files of each fileset from the selected followers.

    Globs are relative to each follower's workspace (`*` stays within a directory, `**`
    spans directories; an exclude also drops everything below a matching directory).
    Files are checked with sha256 on the follower before and after the transfer and on the
    copy; a file that changed meanwhile is fetched once more, then reported. When one host
    provided files they land in DEST; when several did, in DEST/<fileset>/<host>/. Beside
    them, <fileset>.slurp.json lists host, path, size, mtime and sha256 of every file.

    Exit 0 when every fileset arrived from every host that has it; 1 when a host was
    unreachable, a file could not be fetched or verified, or a required fileset was found
    on no host; 7 for a bad selection or fileset. With --json: one slurp document.
    """
    if not (fileset_names or fileset_data or fileset_files):
        raise click.UsageError(
            "nothing to fetch: give --fileset NAME, --fileset-data DATA or --fileset-file PATH",
            ctx=ctx,
        )
    selector = selector_from_options(hosts, tags, all_)
    app = FleetContext.of(ctx)
    specs = resolve_filesets(app, fileset_names, fileset_data, fileset_files)
    concurrency = _DEFAULT_TRANSFERS
    if app.config.typed.concurrency is not None and app.config.typed.concurrency.transfer:
        concurrency = app.config.typed.concurrency.transfer
    with app.api_client() as api:
        selected = select_followers(selector, api.followers().followers)
    target_dir = (dest or Path.cwd()).expanduser().resolve()
    envelope = asyncio.run(_slurp(app, selected, specs, target_dir, concurrency))
    if app.json:
        echo_json(envelope)
        return int(envelope.exit_code)
    for fileset in envelope.filesets:
        size = sum(f.size for f in fileset.files)
        origin = ", ".join(fileset.answered) or "no host"
        click.echo(
            f"{fileset.name}: {len(fileset.files)} file(s), {size} bytes from {origin} "
            f"-> {fileset.dest}"
        )
    for line in envelope.error_lines():
        click.echo(f"error: {line}", err=True)
    return int(envelope.exit_code)
