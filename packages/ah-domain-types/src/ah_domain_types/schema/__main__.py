"""``python -m ah_domain_types.schema [--write | --check]``: regenerate or check the schema."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from . import REGENERATE_COMMAND, SCHEMA_FILENAME, render_schema

DEFAULT_OUTPUT = Path(__file__).resolve().with_name(SCHEMA_FILENAME)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ah_domain_types.schema",
        description="Print, write or check the JSON Schema generated from ah-domain-types.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the schema file")
    mode.add_argument(
        "--check", action="store_true", help="exit 1 if the schema file is out of date"
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}"
    )
    args = parser.parse_args(argv)
    text = render_schema()
    output: Path = args.output
    if args.write:
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}", file=sys.stderr)
        return 0
    if args.check:
        try:
            current = output.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = ""
        if current == text:
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True),
            text.splitlines(keepends=True),
            fromfile=f"{output} (committed)",
            tofile="generated",
            n=2,
        )
        sys.stderr.writelines(list(diff)[:60])
        print(
            f"\n{output} is out of date with the types; regenerate it with:\n"
            f"  {REGENERATE_COMMAND}",
            file=sys.stderr,
        )
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
