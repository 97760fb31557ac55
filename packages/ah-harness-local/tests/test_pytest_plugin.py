"""The fixtures, as a test suite sees them: in a separate pytest session, then checked after."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def test_fixtures_start_real_sshd_and_clean_up_at_session_end(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    record = tmp_path / "pids.txt"
    pytester.makepyfile(
        test_inner=f"""
        from pathlib import Path

        RECORD = Path({str(record)!r})

        def _note(server):
            with RECORD.open("a") as f:
                f.write(" ".join(map(str, server.process.tree_pids())) + "\\n")

        def test_function_scoped(sshd):
            assert sshd.run("echo", "one").stdout == "one\\n"
            _note(sshd)

        def test_session_factory_left_running(sshd_factory):
            for server in sshd_factory.many(2):
                assert server.run("echo", "two").stdout == "two\\n"
                _note(server)  # not stopped here: the session end must do it
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)
    pids = [int(p) for p in record.read_text().split()]
    assert len(pids) >= 3
    for pid in pids:
        assert _gone(pid), f"pid {pid} outlived the pytest session that started it"
