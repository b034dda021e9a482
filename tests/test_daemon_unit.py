"""Daemon pieces in-process: file locations, settings layers, the CLI, log redaction."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import pytest

from imgserve import cli, config, daemon, logs
from imgserve.urls import redact_url

ROOT = ("/var/run/imgserve.pid", "/var/log/imgserve/imgserve.log", "/var/lib/imgserve")
USER = ("/home/u/.imgserve/imgserve.pid", "/home/u/.imgserve/imgserve.log", "/home/u/.imgserve")
STATE = ("/srv/s/imgserve.pid", "/srv/s/imgserve.log", "/srv/s")


@pytest.mark.parametrize(
    ("state_dir", "pid", "logdir", "euid", "expected"),
    [
        (None, None, None, 0, ROOT),
        (None, None, None, 1000, USER),
        ("/srv/s", None, None, 0, STATE),
        ("/srv/s", None, None, 1000, STATE),
        (None, "/run/x.pid", "/logs", 1000, ("/run/x.pid", "/logs/imgserve.log", USER[2])),
        (None, "/run/x.pid", None, 0, ("/run/x.pid", ROOT[1], ROOT[2])),
    ],
)
def test_file_locations(
    state_dir: str | None, pid: str | None, logdir: str | None, euid: int, expected: tuple[str, ...]
) -> None:
    """0.2's rule: root uses /var/log and /var/run, others ~/.imgserve; --state-dir overrides."""
    paths = daemon.resolve_paths(
        Path(state_dir) if state_dir else None,
        Path(pid) if pid else None,
        Path(logdir) if logdir else None,
        euid=euid,
        home=Path("/home/u"),
    )
    assert (str(paths.pid_file), str(paths.log_file), str(paths.data_dir)) == expected


def test_settings_layers(tmp_path: Path) -> None:
    """Flags beat IMGSERVE_* variables, which beat the TOML file, which beats defaults."""
    toml = tmp_path / "c.toml"
    toml.write_text('port = 1111\nworkers = 3\n[transport]\nallow_host = ["Img.Example."]\n')
    env = {"IMGSERVE_PORT": "2222", "IMGSERVE_ALLOW_NET": "10.0.0.0/8, 127.0.0.1/32"}
    settings = config.load({"port": 3333}, config_file=toml, environ=env)
    assert settings.server.port == 3333
    assert settings.worker.workers == 3
    assert settings.transport.policy.allow_hosts == ("img.example",)
    assert settings.transport.policy.allow_nets == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
    )
    assert config.load({}, environ=env).server.port == 2222
    assert config.load({}, environ={}).server.port == 8602


def test_settings_file_roots_and_unknown_keys(tmp_path: Path) -> None:
    """IMGSERVE_FILE_ROOT is colon-separated; an unknown TOML key is an error."""
    env = {"IMGSERVE_FILE_ROOT": f"{tmp_path}/a:{tmp_path}/b"}
    assert config.load({}, environ=env).transport.file_roots == (tmp_path / "a", tmp_path / "b")
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="prot"):
        config.load({}, config_file=bad, environ={})


def test_cli_single_and_double_dash_flags() -> None:
    """0.2's -host/-port/-pid/-logdir/-FORCE and the --long forms parse the same."""
    parser = cli.build_parser()
    old = parser.parse_args(
        ["start", "-host", "127.0.0.1", "-port", "9000", "-pid", "/p", "-FORCE"]
    )
    new = parser.parse_args(["start", "--host", "127.0.0.1", "--port", "9000", "--pid", "/p"])
    assert (old.host, old.port, old.pid, old.force) == ("127.0.0.1", 9000, "/p", True)
    assert (new.host, new.port, new.pid, new.force) == ("127.0.0.1", 9000, "/p", False)
    settings = cli.settings_from(parser.parse_args(["serve", "--allow-net", "127.0.0.0/8"]))
    assert settings.transport.policy.allow_nets == (ipaddress.ip_network("127.0.0.0/8"),)


def test_cli_version_and_status_not_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`version` exits 0; `status` of a stopped instance exits 3 (LSB); bad settings exit 2."""
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out.startswith("imgserve ")
    assert cli.main(["status", "--state-dir", str(tmp_path)]) == 3
    assert "not running" in capsys.readouterr().out
    assert cli.main(["stop", "--state-dir", str(tmp_path)]) == 0
    assert cli.main(["status", "--state-dir", str(tmp_path), "--allow-net", "nonsense"]) == 2


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://user:pw@example.com/x", "ftp://user:***@example.com/x"),
        ("s3://AKIA:secret@bucket/key", "s3://AKIA:***@bucket/key"),
        ("http://token@example.com/", "http://***@example.com/"),
        ("http://example.com/a:b@c", "http://example.com/a:b@c"),
        ("job x ftp://u:p@h/1 and https://a:b@h/2", "job x ftp://u:***@h/1 and https://a:***@h/2"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    """Passwords in URLs become *** wherever they appear in a string."""
    assert redact_url(url) == expected


def test_log_filter_redacts(tmp_path: Path) -> None:
    """The log file never holds a URL password, whatever the call site passed."""
    log_file = tmp_path / "logs" / "imgserve.log"
    logs.configure(log_file, max_bytes=1 << 20, backups=1)
    logging.getLogger("imgserve.test").info("fetch %s", "ftp://bob:hunter2@h/x.jpg")
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = log_file.read_text()
    assert "hunter2" not in text and "ftp://bob:***@h/x.jpg" in text
    assert oct(log_file.stat().st_mode & 0o777) == "0o640"
    logs.configure(None, max_bytes=1, backups=0)


def test_every_setting_flag_is_a_setting() -> None:
    """Each CLI flag that carries a setting names one config.load knows (no silent drop)."""
    assert set(cli._SETTING_FLAGS) <= set(config.option_names())
    parser = cli.build_parser()
    dests = {a.dest for a in parser._subparsers._group_actions[0].choices["serve"]._actions}  # type: ignore[union-attr]
    assert set(cli._SETTING_FLAGS) <= dests


def test_a_watermark_file_that_is_not_an_image_stops_the_start(tmp_path: Path) -> None:
    """--watermark names a file imgserve cannot decode: StartupError naming it, before
    any job could fail on it; a PNG passes."""
    bad = tmp_path / "logo.png"
    bad.write_text("not an image")
    with pytest.raises(daemon.StartupError, match="watermark 'logo'"):
        daemon.check_watermarks(config.load({"watermark": [f"logo={bad}"]}))
    good = tmp_path / "good.png"
    good.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    daemon.check_watermarks(config.load({"watermark": [f"logo={good}"]}))
