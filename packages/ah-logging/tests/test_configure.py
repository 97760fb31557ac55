"""configure_logging with real loguru sinks: stderr, files, levels, RUST_LOG, stdlib, redaction."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from ah_logging import (
    JSON_FIELDS,
    DirectiveError,
    InterceptHandler,
    LogFileError,
    LogSettings,
    configure_logging,
)

TEXT_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<level>[A-Z]+) +(?P<logger>[^:]+): "
    r"(?P<message>.*)$"
)


def log_from(module: str, level: str, message: str, /, **extra: Any) -> None:
    """Log through loguru from code whose ``__name__`` is ``module`` (as a real module would)."""
    code = compile("logger.bind(**extra).log(level, message)", f"<{module}>", "exec")
    exec(
        code,
        {"__name__": module, "logger": logger, "extra": extra, "level": level, "message": message},
    )


def text_records(text: str) -> list[dict[str, str]]:
    records = []
    for line in text.splitlines():
        match = TEXT_LINE.match(line)
        if match:
            records.append(match.groupdict())
    return records


def json_records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def messages(text: str) -> list[str]:
    return [record["message"] for record in text_records(text)]


def test_cli_default_is_info_text_on_stderr_only(capfd: pytest.CaptureFixture[str]) -> None:
    handle = configure_logging("ah-fleetctl", "cli", LogSettings(), env={})
    log_from("ah_fleetctl.main", "DEBUG", "hidden debug")
    log_from("ah_fleetctl.main", "INFO", "visible info")
    out, err = capfd.readouterr()
    assert out == ""
    records = text_records(err)
    assert [(r["level"], r["logger"], r["message"]) for r in records] == [
        ("INFO", "ah_fleetctl.main", "visible info")
    ]
    stamp = datetime.fromisoformat(records[0]["ts"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=5)
    assert (handle.stderr_format, handle.file_path, handle.file_format) == ("text", None, None)


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("warning", ["WARNING", "ERROR"]),
        ("ERROR", ["ERROR"]),
        ("debug", ["DEBUG", "INFO", "WARNING", "ERROR"]),
        ("trace", ["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"]),
        ("off", []),
    ],
)
def test_level_flag_filters(
    capsys: pytest.CaptureFixture[str], level: str, shown: list[str]
) -> None:
    configure_logging("ah-fleetctl", "cli", LogSettings(level=level), env={})
    for name in ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"):
        log_from("ah_fleetctl", name, f"at {name}")
    assert [r["level"] for r in text_records(capsys.readouterr().err)] == shown


def test_json_on_stderr_has_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("ah-fleetctl", "cli", LogSettings(format="json"), env={})
    log_from(
        "ah_fleetctl.run",
        "INFO",
        "run {x} done",
        host="mac-1",
        attempt=2,
        level="user-level",
        nested={"a": [1, 2]},
        path=Path("/tmp/p"),
    )
    out, err = capsys.readouterr()
    assert out == ""
    (record,) = json_records(err)
    assert record["level"] == "INFO"
    assert record["logger"] == "ah_fleetctl.run"
    assert record["message"] == "run {x} done"
    assert record["binary"] == "ah-fleetctl"
    assert record["host"] == "mac-1" and record["attempt"] == 2
    assert record["nested"] == {"a": [1, 2]}
    assert record["path"] == "/tmp/p"
    assert record["extra.level"] == "user-level"  # a colliding extra does not replace "level"
    assert datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).utcoffset() == timedelta(0)
    assert record["ts"].endswith("Z")
    assert set(JSON_FIELDS) - {"exception"} <= set(record)


def test_log_file_gets_text_for_a_cli_and_is_appended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nested" / "cli.log"
    path.parent.mkdir()
    path.write_text("earlier line\n", encoding="utf-8")
    handle = configure_logging("ah-fleetctl", "cli", LogSettings(file=str(path)), env={})
    log_from("ah_fleetctl", "INFO", "to both")
    handle.close()
    content = path.read_text(encoding="utf-8")
    assert content.startswith("earlier line\n")
    assert messages(content) == ["to both"]
    assert messages(capsys.readouterr().err) == ["to both"]
    assert handle.file_format == "text"


def test_log_dir_writes_binary_log_as_json_for_a_daemon(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log_dir = tmp_path / "does" / "not" / "exist"
    handle = configure_logging("ah-followerd", "daemon", LogSettings(dir=str(log_dir)), env={})
    assert handle.file_path == log_dir / "ah-followerd.log"
    log_from("ah_followerd.heartbeat", "INFO", "heartbeat sent", seq=7)
    log_from("ah_followerd.heartbeat", "DEBUG", "daemon default is info")
    handle.close()
    (record,) = json_records((log_dir / "ah-followerd.log").read_text(encoding="utf-8"))
    assert (record["binary"], record["logger"], record["seq"]) == (
        "ah-followerd",
        "ah_followerd.heartbeat",
        7,
    )
    out, err = capfd.readouterr()
    assert out == ""
    assert [(r["message"]) for r in text_records(err)] == ["heartbeat sent seq=7"]


def test_daemon_format_flag_applies_to_both_sinks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "d.log"
    handle = configure_logging(
        "ah-access-pointd", "daemon", LogSettings(file=str(path), format="text"), env={}
    )
    log_from("ah_access_pointd", "WARNING", "plain")
    handle.close()
    assert messages(path.read_text(encoding="utf-8")) == ["plain"]
    assert messages(capsys.readouterr().err) == ["plain"]


def test_rust_log_overrides_the_configured_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("ah-fleetctl", "cli", LogSettings(level="error"), env={"RUST_LOG": "debug"})
    log_from("ah_fleetctl", "DEBUG", "shown by RUST_LOG")
    log_from("ah_fleetctl", "TRACE", "still hidden")
    assert messages(capsys.readouterr().err) == ["shown by RUST_LOG"]


def test_rust_log_module_directives(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"RUST_LOG": "ah_connectivity::quic=trace,warn"}
    configure_logging("ah-followerd", "daemon", LogSettings(level="info"), env=env)
    log_from("ah_connectivity.quic.client", "TRACE", "quic trace")
    log_from("ah_connectivity.quic", "DEBUG", "quic debug")
    log_from("ah_connectivity.http", "INFO", "http info hidden")
    log_from("ah_connectivity.http", "WARNING", "http warning")
    log_from("ah_connectivity.quicker", "DEBUG", "not a sub-module: hidden")
    assert messages(capsys.readouterr().err) == ["quic trace", "quic debug", "http warning"]


def test_rust_log_without_bare_level_keeps_configured_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"RUST_LOG": "ah_connectivity=debug"}
    configure_logging("ah-fleetctl", "cli", LogSettings(level="warning"), env=env)
    log_from("ah_connectivity.quic", "DEBUG", "debug from the module")
    log_from("ah_fleetctl", "INFO", "info elsewhere hidden")
    log_from("ah_fleetctl", "WARNING", "warning elsewhere")
    assert messages(capsys.readouterr().err) == ["debug from the module", "warning elsewhere"]


def test_level_flag_takes_directives(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("ah-fleetctl", "cli", LogSettings(level="ah_x.y=debug,error"), env={})
    log_from("ah_x.y.z", "DEBUG", "module debug")
    log_from("ah_x", "WARNING", "hidden warning")
    assert messages(capsys.readouterr().err) == ["module debug"]


def test_bad_rust_log_raises_and_keeps_previous_setup(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("ah-fleetctl", "cli", LogSettings(), env={})
    with pytest.raises(DirectiveError) as caught:
        configure_logging("ah-fleetctl", "cli", LogSettings(), env={"RUST_LOG": "ah=loud,info"})
    assert str(caught.value).startswith("RUST_LOG: ")
    assert "'ah=loud'" in str(caught.value)
    log_from("ah_fleetctl", "INFO", "still configured")
    assert messages(capsys.readouterr().err) == ["still configured"]


def test_blank_rust_log_is_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("ah-fleetctl", "cli", LogSettings(level="warning"), env={"RUST_LOG": "  "})
    log_from("ah_fleetctl", "INFO", "hidden")
    assert messages(capsys.readouterr().err) == []


def test_unwritable_log_file_raises_and_keeps_previous_setup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("ah-fleetctl", "cli", LogSettings(), env={})
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(LogFileError, match=re.escape(str(blocker / "x.log"))):
        configure_logging("ah-fleetctl", "cli", LogSettings(file=str(blocker / "x.log")), env={})
    log_from("ah_fleetctl", "INFO", "still configured")
    assert messages(capsys.readouterr().err) == ["still configured"]


# -- stdlib logging --------------------------------------------------------------------


def test_stdlib_records_keep_their_logger_name_and_caller(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("ah-fleetctl", "cli", LogSettings(format="json"), env={})
    logging.getLogger("ah_custom.sub").info("from %s", "stdlib")
    line = sys._getframe().f_lineno - 1
    logging.getLogger("ah_custom.sub").debug("debug hidden at info")
    (record,) = json_records(capsys.readouterr().err)
    assert record["logger"] == "ah_custom.sub"
    assert record["message"] == "from stdlib"
    assert record["function"] == "test_stdlib_records_keep_their_logger_name_and_caller"
    assert record["line"] == line
    assert record["level"] == "INFO"


def test_stdlib_exceptions_are_logged(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("ah-fleetctl", "cli", LogSettings(), env={})
    try:
        raise RuntimeError("it broke, password=hunter2")
    except RuntimeError:
        logging.getLogger("ah_custom").exception("failure")
    err = capsys.readouterr().err
    assert messages(err) == ["failure"]
    assert "RuntimeError: it broke, password=***" in err
    assert "hunter2" not in err


def test_noisy_libraries_stay_at_warning_unless_asked(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("ah-followerd", "daemon", LogSettings(level="debug"), env={})
    logging.getLogger("paramiko.transport").info("paramiko info hidden")
    logging.getLogger("paramiko.transport").warning("paramiko warning")
    logging.getLogger("asyncio").debug("asyncio debug hidden")
    logging.getLogger("ah_custom").debug("own debug")
    assert messages(capsys.readouterr().err) == ["paramiko warning", "own debug"]

    configure_logging(
        "ah-followerd",
        "daemon",
        LogSettings(level="paramiko.transport=debug,info"),
        env={"RUST_LOG": "aioquic=info"},
    )
    logging.getLogger("paramiko.transport").debug("transport debug")
    logging.getLogger("paramiko.client").info("client info hidden")
    logging.getLogger("aioquic.quic").info("aioquic info")
    assert messages(capsys.readouterr().err) == ["transport debug", "aioquic info"]


def test_stdlib_respects_rust_log_module_directives(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(
        "ah-followerd",
        "daemon",
        LogSettings(),
        env={"RUST_LOG": "paramiko=warning,litestar=debug,error"},
    )
    logging.getLogger("litestar.app").debug("litestar debug")
    logging.getLogger("paramiko").info("hidden")
    logging.getLogger("ah_followerd").warning("hidden by bare error")
    assert messages(capsys.readouterr().err) == ["litestar debug"]


# -- redaction in every sink -----------------------------------------------------------

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNlY3JldA"
PEM = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
SECRETS = [
    "tok-3f9a",
    "hunter2",
    "b3BlbnNzaC1rZXktdjEAAAAA",
    "c2lnbmF0dXJlLXNlY3JldA",
    "eyJzdWIiOiJhbGljZSJ9",
    "pw-in-extra",
    "nested-key",
    "patched-in",
]


def _log_secrets() -> None:
    logger.bind(password="pw-in-extra", config={"ssh": {"private_key": "nested-key"}}).info(
        "auth Bearer tok-3f9a with password=hunter2 and {} and key {}", JWT, PEM
    )
    logger.patch(lambda record: record["extra"].update(token="patched-in")).info("late patch")
    logging.getLogger("httpx").warning("GET /api?token=tok-3f9a")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_reach_no_sink(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], log_format: Any
) -> None:
    path = tmp_path / "secret.log"
    handle = configure_logging(
        "ah-followerd", "daemon", LogSettings(file=str(path), format=log_format), env={}
    )
    _log_secrets()
    handle.close()
    out, err = capfd.readouterr()
    content = path.read_text(encoding="utf-8")
    assert out == ""
    for sink_output in (err, content):
        assert sink_output.count("\n") >= 3
        assert "***" in sink_output
        for secret in SECRETS:
            assert secret not in sink_output
    if log_format == "json":
        first, second, third = json_records(content)
        assert first["password"] == "***"
        assert first["config"] == {"ssh": {"private_key": "***"}}
        assert second["token"] == "***"
        assert third["logger"] == "httpx" and third["message"] == "GET /api?token=***"


# -- idempotence -----------------------------------------------------------------------


def test_configure_twice_replaces_instead_of_duplicating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first_file = tmp_path / "first.log"
    second_file = tmp_path / "second.log"
    first = configure_logging("ah-followerd", "daemon", LogSettings(file=str(first_file)), env={})
    second = configure_logging("ah-followerd", "daemon", LogSettings(file=str(second_file)), env={})
    third = configure_logging("ah-followerd", "daemon", LogSettings(file=str(second_file)), env={})
    log_from("ah_followerd", "INFO", "once")
    logging.getLogger("ah_custom").warning("stdlib once")
    assert messages(capsys.readouterr().err) == ["once", "stdlib once"]
    assert first_file.read_text(encoding="utf-8") == ""
    assert [r["message"] for r in json_records(second_file.read_text(encoding="utf-8"))] == [
        "once",
        "stdlib once",
    ]
    interceptors = [h for h in logging.getLogger().handlers if isinstance(h, InterceptHandler)]
    assert interceptors == [third.intercept]
    first.close()  # closing a replaced handle does not disturb the current one
    second.close()
    log_from("ah_followerd", "INFO", "still there")
    assert messages(capsys.readouterr().err) == ["still there"]
    third.close()
    log_from("ah_followerd", "ERROR", "nowhere")
    assert messages(capsys.readouterr().err) == []
    assert not any(isinstance(h, InterceptHandler) for h in logging.getLogger().handlers)


def test_the_patcher_redacts_records_for_any_sink(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("ah-fleetctl", "cli", LogSettings(), env={})
    seen: list[dict[str, Any]] = []
    logger.add(lambda message: seen.append(dict(message.record)), level="INFO", format="{message}")
    logger.bind(api_key="k-123456", host="h").info("Authorization: Bearer abc123")
    (record,) = seen
    assert record["extra"] == {"api_key": "***", "host": "h"}
    assert record["message"] == "Authorization: Bearer ***"
    capsys.readouterr()
