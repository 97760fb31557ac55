"""What a finished ``ah-fleetctl`` process gave: the record CLI tests assert on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["CliResult"]


@dataclass(frozen=True)
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """stdout as exactly one JSON document (fails if there is anything else)."""
        assert self.stdout.strip(), f"no JSON on stdout; stderr: {self.stderr}"
        return json.loads(self.stdout)

    def __str__(self) -> str:
        # The tail of each stream: enough to see why an assertion on this result failed.
        return (
            f"ah-fleetctl {' '.join(self.args)} -> {self.returncode}\n"
            f"--- stdout\n{self.stdout[-4000:]}--- stderr\n{self.stderr[-4000:]}"
        )
