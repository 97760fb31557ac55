"""``ah-tree-digest``: the follower-side digest command (console script).

It runs on a follower, over SSH, to verify the fence: ``ah-tree-digest --root DIR
[--ignore PATTERN]... [--json] [--no-exec-bit]`` prints the content id of the tree (with
``--json``, one JSON document with the id and the manifest). The algorithm is
:mod:`ah_mutagen_project.digest_script`, the very code the leader's snapshot uses, and this
module imports nothing else: the command works with no other ah-* package importable.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ah_mutagen_project.digest_script import main as _digest_main

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``ah-tree-digest``; exits with the command's status."""
    sys.exit(_digest_main(argv))


if __name__ == "__main__":
    main()
