"""SidecarConfig: flags > COALESCE_SIDECAR_* environment > TOML > defaults, with clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from coalesce.sidecar import ConfigError, SidecarConfig
from coalesce.sidecar.command import configure_parser
from coalesce.sidecar.config import SETTINGS, parse_address


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(list(argv))


def test_flags_beat_environment_which_beats_toml_which_beats_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text(
        '[sidecar]\nupstream = ["10.0.0.1:9042", "10.0.0.2"]\nlisten = "0.0.0.0:9000"\n'
        'max_waiters = 10\nrack = "r-toml"\n'
    )
    environ = {
        "COALESCE_SIDECAR_LISTEN": "127.0.0.1:9001",
        "COALESCE_SIDECAR_MAX_WAITERS": "20",
        "COALESCE_SIDECAR_REQUEST_TIMEOUT": "250ms",
    }
    config = SidecarConfig.from_sources(
        _args("--max-waiters", "30", "--config", str(toml)), environ
    )
    assert config.upstream == (("10.0.0.1", 9042), ("10.0.0.2", 9042))  # TOML
    assert config.listen == ("127.0.0.1", 9001)  # environment over TOML
    assert config.max_waiters == 30  # flag over environment
    assert config.request_timeout == 0.25
    assert config.rack == "r-toml"
    assert config.connections_per_node == 2  # default


def test_top_level_toml_keys_work_too(tmp_path: Path) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text('upstream = "h1:1,h2:2"\nmetrics = "off"\nupstream_tls = true\n')
    config = SidecarConfig.from_sources(None, {}, toml)
    assert config.upstream == (("h1", 1), ("h2", 2))
    assert config.metrics is None
    assert config.upstream_tls is True


@pytest.mark.parametrize(
    ("argv", "environ", "fragment"),
    [
        ((), {}, "no upstream"),
        (("--upstream", "h:99999"), {}, "--upstream: port 99999 out of range"),
        (("--upstream", "h"), {"COALESCE_SIDECAR_MAX_WAITERS": "many"},
         "COALESCE_SIDECAR_MAX_WAITERS: expected an integer"),
        (("--upstream", "h", "--request-timeout", "soon"), {}, "--request-timeout: invalid"),
        (("--upstream", "h", "--connections-per-node", "0"), {},
         "--connections-per-node: must be 1..64, got 0"),
        (("--upstream", "h", "--tls-cert", __file__), {}, "tls_cert and tls_key"),
        (("--upstream", "h", "--upstream-ca", "missing-ca.pem"), {},
         "--upstream-ca: no such file: 'missing-ca.pem'"),
        (("--upstream", "h", "--request-timeout", "0"), {},
         "--request-timeout: must be > 0, got 0"),
        (("--upstream", "h"), {"COALESCE_SIDECAR_IDLE_TIMEOUT": "-1s"},
         "COALESCE_SIDECAR_IDLE_TIMEOUT: invalid duration"),
        (("--upstream", "h", "--max-client-buffer", "16K"), {},
         "--max-client-buffer: must be >= 64KiB, got 16KiB"),
        (("--upstream", "h", "--gc-threshold", "99"), {}, "--gc-threshold: must be >= 100"),
        (("--upstream", "h", "--max-connections", "0"), {}, "--max-connections: must be >= 1"),
        (("--upstream", "h", "--log-level", "loud"), {},
         "--log-level: expected one of debug, info, warning, error, got 'loud'"),
        (("--upstream", "h"), {"COALESCE_SIDECAR_LOG_FORMAT": "xml"},
         "COALESCE_SIDECAR_LOG_FORMAT: expected one of text, json"),
        (("--upstream", "h"), {"COALESCE_SIDECAR_MAX_WAITER": "3"},
         "COALESCE_SIDECAR_MAX_WAITER: no such setting"),
        (("--upstream", "h", "--max-frame-size", "12 parsecs"), {}, "invalid size"),
    ],
)
def test_bad_values_name_the_setting_and_its_source(
    argv: tuple[str, ...], environ: dict[str, str], fragment: str,
) -> None:
    with pytest.raises(ConfigError) as bad:
        SidecarConfig.from_sources(_args(*argv), environ)
    assert fragment in str(bad.value)


def test_unknown_toml_keys_and_broken_toml_are_errors(tmp_path: Path) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text('upstream = "h"\nmax_waiter = 3\n')
    with pytest.raises(ConfigError, match=r"unknown setting.*max_waiter"):
        SidecarConfig.from_sources(None, {}, toml)
    toml.write_text("upstream = [")
    with pytest.raises(ConfigError, match=r"sidecar\.toml"):
        SidecarConfig.from_sources(None, {}, toml)
    with pytest.raises(ConfigError, match="cannot read"):
        SidecarConfig.from_sources(None, {}, tmp_path / "missing.toml")


def test_addresses_parse_hosts_ports_and_ipv6() -> None:
    assert parse_address("db1") == ("db1", 9042)
    assert parse_address("db1:19042") == ("db1", 19042)
    assert parse_address("[::1]:9043") == ("::1", 9043)
    with pytest.raises(ValueError):
        parse_address(":9042")


def test_the_advertised_address_is_never_a_wildcard() -> None:
    assert SidecarConfig(upstream=(("h", 1),), listen=("0.0.0.0", 9042)).advertised_address \
        == "127.0.0.1"
    assert SidecarConfig(upstream=(("h", 1),), listen=("10.1.2.3", 9042)).advertised_address \
        == "10.1.2.3"
    assert SidecarConfig(upstream=(("h", 1),), advertise="10.9.9.9").advertised_address \
        == "10.9.9.9"


def test_advertise_takes_host_and_an_optional_port() -> None:
    with_port = SidecarConfig.from_sources(
        _args("--upstream", "h", "--advertise", "10.0.0.9:19042"))
    assert with_port.advertise == "10.0.0.9:19042"
    assert (with_port.advertised_address, with_port.advertised_port) == ("10.0.0.9", 19042)
    bare = SidecarConfig.from_sources(_args("--upstream", "h", "--advertise", "10.0.0.9"))
    assert (bare.advertised_address, bare.advertised_port) == ("10.0.0.9", None)
    v6 = SidecarConfig(upstream=(("h", 1),), advertise="[::1]:9043")
    assert (v6.advertised_address, v6.advertised_port) == ("::1", 9043)
    with pytest.raises(ConfigError, match="advertise: port 99999 out of range"):
        SidecarConfig(upstream=(("h", 1),), advertise="h:99999")
    with pytest.raises(ConfigError, match="--advertise: port 'x' is not a number"):
        SidecarConfig.from_sources(_args("--upstream", "h", "--advertise", "h:x"))


NEW_DEFAULTS = {
    "handshake_timeout": 10.0,
    "idle_timeout": 300.0,
    "max_connections": None,
    "max_client_requests": 2048,
    "max_client_buffer": 4 * 1024 * 1024,
    "heartbeat_interval": 5.0,
    "heartbeat_timeout": 5.0,
    "max_pools": 64,
    "pool_idle_timeout": 60.0,
    "max_logins": 64,
    "prepared_cache": 100_000,
    "prepared_cache_bytes": 64 * 1024 * 1024,
    "gc_freeze": True,
    "gc_threshold": 50_000,
    "log_level": "info",
    "log_format": "text",
}


def test_connection_limits_and_logging_settings_have_their_documented_defaults() -> None:
    config = SidecarConfig(upstream=(("h", 1),))
    assert {name: getattr(config, name) for name in NEW_DEFAULTS} == NEW_DEFAULTS


def test_new_settings_parse_from_flags_environment_and_toml(tmp_path: Path) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text(
        'upstream = ["h"]\nmax_client_buffer = "1MiB"\nidle_timeout = "off"\n'
        'gc_freeze = false\nprepared_cache_bytes = 131072\nheartbeat_timeout = 2.5\n'
    )
    environ = {
        "COALESCE_SIDECAR_MAX_WAITERS": "unlimited",
        "COALESCE_SIDECAR_MAX_CONNECTIONS": "10_000",
        "COALESCE_SIDECAR_LOG_FORMAT": "JSON",
        "COALESCE_SIDECAR_HANDSHAKE_TIMEOUT": "1500ms",
    }
    config = SidecarConfig.from_sources(
        _args("--max-client-requests", "16", "--heartbeat-interval", "250ms",
              "--log-level", "debug", "--no-upstream-verify", "--config", str(toml)),
        environ,
    )
    assert config.max_client_buffer == 1024 * 1024
    assert config.idle_timeout is None
    assert config.gc_freeze is False
    assert config.prepared_cache_bytes == 128 * 1024
    assert config.heartbeat_timeout == 2.5
    assert config.max_connections == 10_000
    assert config.max_waiters is None
    assert config.log_format == "json"
    assert config.handshake_timeout == 1.5
    assert config.max_client_requests == 16
    assert config.heartbeat_interval == 0.25
    assert config.log_level == "debug"
    assert config.upstream_verify is False


def test_every_setting_has_one_flag_one_variable_and_one_toml_key() -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    for setting in SETTINGS:
        assert setting.flag == "--" + setting.name.replace("_", "-")
        assert setting.env == "COALESCE_SIDECAR_" + setting.name.upper()
        assert setting.key == setting.name
        assert setting.flag in flags
        assert setting.help
    help_text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "--max-client-buffer SIZE unsent answer bytes" in help_text
    assert "(default: 4MiB; >= 64KiB)" in help_text
    assert "(default: 2; 1..64)" in help_text
    assert "--no-gc-freeze" in help_text


def test_the_readme_lists_every_setting_with_its_default() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in readme.splitlines()
            if line.startswith("| `")}
    for setting in SETTINGS:
        row = rows.get(f"`{setting.name}`")
        assert row is not None, f"README has no row for {setting.name}"
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert cells[1].startswith(f"`{setting.flag}`")
        assert cells[2] == setting.describe_default()
        assert cells[3] == setting.describe_limits()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", [s.name for s in SETTINGS if s.metavar == "DURATION"])
def test_durations_reject_nan_and_infinity_from_toml_and_keywords(
    tmp_path: Path, name: str, value: str,
) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text(f'upstream = "h"\n{name} = {value}\n')
    with pytest.raises(ConfigError, match=rf"sidecar\.toml: {name}: expected a finite duration"):
        SidecarConfig.from_sources(None, {}, toml)
    with pytest.raises(ConfigError, match=rf"^{name}: expected a finite duration"):
        SidecarConfig(upstream=(("h", 1),), **{name: float(value)})


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("upstream = 42", "upstream: expected \"host:port,host:port\" or a list"),
        ("upstream = [42]", "upstream: expected each node as a string, got 42"),
        ("upstream = []", "upstream: empty list"),
        ('upstream = "h"\nlisten = 9042', 'listen: expected "host:port" as a string'),
        ('upstream = "h"\nmax_waiters = true', "max_waiters: expected an integer, got True"),
        ('upstream = "h"\nmax_queued = 1.5', "max_queued: expected an integer, got 1.5"),
        ('upstream = "h"\nupstream_tls = "maybe"', "upstream_tls: expected true or false"),
        ('upstream = "h"\nrequest_timeout = true', "request_timeout: expected a duration"),
    ],
)
def test_toml_values_of_the_wrong_type_say_what_was_expected(
    tmp_path: Path, line: str, fragment: str,
) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text(line + "\n")
    with pytest.raises(ConfigError) as bad:
        SidecarConfig.from_sources(None, {}, toml)
    assert f"{toml}: {fragment}" in str(bad.value)


def test_a_toml_file_that_is_not_utf8_is_named_in_one_line(tmp_path: Path) -> None:
    toml = tmp_path / "latin1.toml"
    toml.write_bytes('upstream = "h"\nrack = "Zürich"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text \(byte 0xfc"):
        SidecarConfig.from_sources(None, {}, toml)


def test_tls_files_must_exist_and_be_readable_when_configured(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="upstream_ca: no such file"):
        SidecarConfig(upstream=(("h", 1),), upstream_ca=tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match="tls_cert: not a regular file"):
        SidecarConfig(upstream=(("h", 1),), tls_cert=tmp_path, tls_key=tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked for content here\n")
    assert SidecarConfig(upstream=(("h", 1),), upstream_ca=ca).upstream_ca == ca
