"""Settings: each declared once, every value range-checked, every old name still working."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import pytest

from service import config
from service.config import SettingError, Settings
from service.startup import ExitCode
from tests.servers import failed_start

CONFIGURATION = Path(__file__).parent.parent / "docs" / "configuration.md"

# Every flag and variable name the documentation has named: they must keep working.
DOCUMENTED = {
    "address": "127.0.0.1:1",
    "database": "x.db",
    "engine": "simulated",
    "devices_dir": "devices",
    "dial_timeout": "3",
    "worker_heartbeat": "1.5",
    "worker_crash_limit": "2",
    "log_level": "debug",
    "qr_timeout": "4",
    "qr_first_seconds": "61",
    "qr_rotation_seconds": "21",
    "qr_codes": "3",
    "shutdown_grace": "2",
    "public_token_file": "pub.txt",
    "internal_token_file": "int.txt",
    "send_rate": "0",
    "send_burst": "7",
    "max_watchers_per_session": "9",
    "max_watchers": "99",
    "metrics_address": "127.0.0.1:9464",
    "log_format": "json",
    "http_address": "127.0.0.1:8081",
    "cors_origins": "https://hub.example,http://localhost:3000",
    "sse_keepalive": "5",
}

BAD = [
    ("address", ":50051", "host:port"),
    ("address", "localhost", "host:port"),
    ("address", "127.0.0.1:99999", "65535"),
    ("address", "127.0.0.1:-1", "host:port"),
    ("address", "", "host:port"),
    ("metrics_address", ":9464", "host:port"),
    ("metrics_address", "127.0.0.1:70000", "65535"),
    ("engine", "whatsapp", "one of"),
    ("log_level", "verbose", "one of"),
    ("log_level", "INFO ", "one of"),
    ("log_format", "xml", "one of"),
    ("dial_timeout", "0", "above 0"),
    ("dial_timeout", "-5", "above 0"),
    ("worker_heartbeat", "nan", "finite"),
    ("qr_timeout", "inf", "finite"),
    ("qr_first_seconds", "1e12", "at most"),
    ("qr_rotation_seconds", "-1", "above 0"),
    ("shutdown_grace", "0", "above 0"),
    ("send_rate", "-0.5", "0 (no limit) or more"),
    ("send_rate", "NaN", "finite"),
    ("send_burst", "0", "1 or more"),
    ("send_burst", "2.5", "whole number"),
    ("qr_codes", "-3", "1 or more"),
    ("worker_crash_limit", "0", "1 or more"),
    ("max_watchers_per_session", "0", "1 or more"),
    ("max_watchers", "many", "whole number"),
    ("database", "", "empty"),
    ("http_address", "8080", "host:port"),
    ("http_address", "localhost:65536", "65535"),
    ("cors_origins", "hub.example", "not an origin"),
    ("cors_origins", "https://hub.example/path", "not an origin"),
    ("sse_keepalive", "0", "above 0"),
    ("allow_unauthenticated_remote", "perhaps", "true or false"),  # a variable only
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser


def _from_flags(*argv: str) -> Settings:
    return config.settings_from(_parser().parse_args(argv), environ={})


def _from_env(**environ: str) -> Settings:
    return config.settings_from(_parser().parse_args([]), environ=environ)


def test_every_documented_flag_and_variable_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("pub.txt").write_text("p1\n")
    Path("int.txt").write_text("i1\n")
    for name, text in DOCUMENTED.items():
        from_flag = _from_flags(f"--{name.replace('_', '-')}={text}")
        from_env = _from_env(**{f"SESSION_MANAGER_{name.upper()}": text})
        assert getattr(from_flag, name) == getattr(from_env, name) == config.parse(name, text)
        assert getattr(from_flag, name) != getattr(Settings(), name), name
    assert _from_flags("--allow-unauthenticated-remote").allow_unauthenticated_remote
    for text, allowed in (("yes", True), ("TRUE", True), ("0", False), ("", False)):
        remote = _from_env(SESSION_MANAGER_ALLOW_UNAUTHENTICATED_REMOTE=text)
        assert remote.allow_unauthenticated_remote is allowed
    tokens = _from_env(SESSION_MANAGER_PUBLIC_TOKEN="a,b", SESSION_MANAGER_INTERNAL_TOKEN="c")
    assert (tokens.public_tokens, tokens.internal_tokens) == ((b"a", b"b"), (b"c",))


def test_flags_win_over_the_environment() -> None:
    argv = _parser().parse_args(["--send-rate=2"])
    settings = config.settings_from(argv, environ={"SESSION_MANAGER_SEND_RATE": "3"})
    assert settings.send_rate == 2.0


def test_the_configuration_page_documents_every_setting() -> None:
    rows = [line for line in CONFIGURATION.read_text().splitlines() if line.startswith("| `--")]
    table = "\n".join(rows)
    for declared in config.options():
        assert f"`{config.flag(declared.name)}`" in table, declared.name
        assert f"`{config.env_name(declared.name)}`" in table, declared.name
    documented = set(re.findall(r"`(--[a-z-]+)`", table))
    assert documented == {config.flag(declared.name) for declared in config.options()}


@pytest.mark.parametrize(("name", "text", "says"), BAD)
def test_a_bad_value_is_refused_naming_where_it_came_from(name: str, text: str, says: str) -> None:
    if name != "allow_unauthenticated_remote":  # that flag takes no value
        option = f"--{name.replace('_', '-')}"
        with pytest.raises(SettingError) as from_flag:
            _from_flags(f"{option}={text}")
        assert str(from_flag.value).startswith(f"{option}: "), from_flag.value
        assert says in str(from_flag.value)
    variable = f"SESSION_MANAGER_{name.upper()}"
    with pytest.raises(SettingError) as from_env:
        _from_env(**{variable: text})
    assert str(from_env.value).startswith(f"{variable}: "), from_env.value
    assert says in str(from_env.value)


def test_good_edge_values_are_accepted() -> None:
    assert _from_flags("--address=[::1]:0").address == "[::1]:0"
    assert _from_flags("--address=localhost:65535").address == "localhost:65535"
    assert _from_flags("--send-rate=0").send_rate == 0
    assert _from_flags("--metrics-address=").metrics_address == ""
    assert _from_flags("--qr-timeout=0.001").qr_timeout == 0.001


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(SettingError, match="finite"):
        Settings(send_rate=math.nan)
    with pytest.raises(SettingError, match="1 or more"):
        dataclasses.replace(Settings(), max_watchers=0)
    with pytest.raises(SettingError, match="go together"):
        Settings(tls_cert=Path("server.pem"))
    with pytest.raises(SettingError, match="needs --tls-cert"):
        Settings(tls_client_ca=Path("ca.pem"))


@pytest.mark.parametrize(
    "argv",
    [
        ("--address=:50051",),
        ("--log-level=loud",),
        ("--send-rate=nan",),
        ("--max-watchers=0",),
        ("--no-such-flag",),
        ("--send-burst",),  # a flag without its value
    ],
)
def test_the_server_refuses_a_bad_setting_in_one_line(tmp_path: Path, argv: tuple[str]) -> None:
    refusal = failed_start(tmp_path / "s.db", *argv)
    assert refusal.code == ExitCode.BAD_SETTING, refusal
    assert len(refusal.lines) == 1, refusal.lines
    assert refusal.lines[0].startswith("session-manager: "), refusal.lines
    assert argv[0].split("=")[0] in refusal.lines[0]
    assert not (tmp_path / "s.db").exists()  # nothing was started


def test_a_bad_variable_is_refused_by_the_server(tmp_path: Path) -> None:
    refusal = failed_start(tmp_path / "s.db", env={"SESSION_MANAGER_QR_TIMEOUT": "-1"})
    assert refusal.code == ExitCode.BAD_SETTING
    assert refusal.lines == [
        "session-manager: SESSION_MANAGER_QR_TIMEOUT: must be a number of seconds above 0 "
        "and at most 31536000, got -1.0"
    ]
