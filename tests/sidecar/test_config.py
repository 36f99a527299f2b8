"""SidecarConfig: flags > COALESCE_SIDECAR_* environment > TOML > defaults, with clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from coalesce.sidecar import ConfigError, SidecarConfig
from coalesce.sidecar.command import configure_parser
from coalesce.sidecar.config import parse_address


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
        (("--upstream", "h", "--connections-per-node", "0"), {}, "connections_per_node"),
        (("--upstream", "h", "--tls-cert", "c.pem"), {}, "tls_cert and tls_key"),
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
