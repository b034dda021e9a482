"""The command line: every flag reaches its setting, and ``imgserve start`` says why the
daemon did not come up (the real CLI as a subprocess) instead of exiting silently."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgserve import cli, config
from tests.e2e.conftest import IMGSERVE, free_port


def parse(*argv: str) -> config.Settings:
    return cli.settings_from(cli.build_parser().parse_args(["serve", *argv]))


def value_at(settings: config.Settings, key: str) -> Any:
    value: Any = settings
    for part in key.split("."):
        value = getattr(value, part)
    return value


# Every flag that carries a setting (0.2's single-dash forms included) and where it lands.
FLAGS = [
    (["-host", "127.0.0.2"], "server.host", "127.0.0.2"),
    (["--host", "127.0.0.2"], "server.host", "127.0.0.2"),
    (["-port", "9001"], "server.port", 9001),
    (["--port", "9001"], "server.port", 9001),
    (["-pid", "/r/i.pid"], "server.pid_file", Path("/r/i.pid")),
    (["--pid", "/r/i.pid"], "server.pid_file", Path("/r/i.pid")),
    (["-logdir", "/l"], "server.log_dir", Path("/l")),
    (["--logdir", "/l"], "server.log_dir", Path("/l")),
    (["--log-dir", "/l"], "server.log_dir", Path("/l")),
    (["--state-dir", "/s"], "server.state_dir", Path("/s")),
    (["--home", "/s"], "server.state_dir", Path("/s")),
    (["--workers", "3"], "worker.workers", 3),
    (["--queue", "redis://h/0"], "server.queue_url", "redis://h/0"),
    (["--queue-max", "9"], "server.queue_max", 9),
    (["--max-outputs", "4"], "server.max_outputs", 4),
    (["--allow-net", "10.0.0.0/8", "--allow-net", "::1/128"], "transport.policy.allow_nets",
     (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))),
    (["--allow-host", "A.Example"], "transport.policy.allow_hosts", ("a.example",)),
    (["--file-root", "/srv/in"], "transport.file_roots", (Path("/srv/in"),)),
    (["--ca-file", "/ca.pem"], "transport.ca_file", Path("/ca.pem")),
    (["--s3-endpoint", "http://m:9000"], "transport.s3_endpoint", "http://m:9000"),
    (["--s3-region", "eu-west-1"], "transport.s3_region", "eu-west-1"),
    (["--job-timeout", "12.5"], "worker.job_timeout_s", 12.5),
    (["--memory-limit-mb", "0"], "worker.memory_limit_mb", 0),
    (["--max-attempts", "5"], "worker.max_attempts", 5),
    (["--worker-nice", "3"], "worker.nice", 3),
    (["--worker-threads", "2"], "worker.threads", 2),
    (["--max-pixels", "1000"], "imaging.max_pixels", 1000),
    (["--download-timeout", "4"], "transport.download_timeout_s", 4.0),
    (["--max-download-bytes", "1024"], "transport.max_download_bytes", 1024),
    (["--upload-timeout", "5"], "transport.upload_timeout_s", 5.0),
    (["--upload-attempts", "2"], "transport.upload_attempts", 2),
    (["--retry-base", "0.1"], "transport.retry_base_s", 0.1),
    (["--retry-max", "3"], "transport.retry_max_s", 3.0),
    (["--max-redirects", "0"], "transport.max_redirects", 0),
    (["--lease", "40"], "worker.lease_s", 40.0),
    (["--shutdown-timeout", "7"], "server.shutdown_timeout_s", 7.0),
    (["--keep-finished", "60"], "server.keep_finished_s", 60.0),
    (["--max-request-bytes", "2048"], "server.max_request_bytes", 2048),
    (["--max-result-pixels", "4000"], "imaging.max_result_pixels", 4000),
    (["--max-result-bytes", "5000"], "imaging.max_result_bytes", 5000),
    (["--log-max-bytes", "4096"], "server.log_max_bytes", 4096),
    (["--log-backups", "2"], "server.log_backups", 2),
    (["--redact-param", "apikey", "--redact-param", "auth"], "server.redact_params",
     ("apikey", "auth")),
    (["--set", "worker.lease_s=9", "--set", "log_backups=1"], "worker.lease_s", 9.0),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "key", "expected"), FLAGS, ids=[" ".join(f[0]) for f in FLAGS])
def test_flag_reaches_its_setting(argv: list[str], key: str, expected: Any) -> None:
    """Each setting flag, in each of its spellings, sets exactly the field it names."""
    assert value_at(parse(*argv), key) == expected


def test_every_parsed_value_is_a_setting_or_known() -> None:
    """No flag is parsed and then silently dropped: each dest is a setting config knows."""
    probe = argparse.ArgumentParser(add_help=False)
    cli._common(probe)
    dests = {a.dest for a in probe._actions} - cli._NOT_SETTINGS
    assert dests == set(cli._SETTING_FLAGS)
    for dest in dests:
        config.lookup(dest)


def test_bad_flag_values_exit_2_naming_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --set or flag value exits 2 with the key and the flag in the message."""
    state = ["--state-dir", str(tmp_path)]
    assert cli.main(["status", *state, "--set", "port=x"]) == 2
    assert "server.port: expected an integer, got 'x' (--set port)" in capsys.readouterr().err
    assert cli.main(["status", *state, "--workers", "0"]) == 2
    assert "worker.workers: must be at least 1, got 0 (--workers)" in capsys.readouterr().err


# --- `imgserve start` as a subprocess: why the daemon did not come up ---------------------


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Any]:
    """Run the real CLI with a state dir in tmp_path; stop anything it left running."""
    state = tmp_path / "state"

    def run_cli(
        *argv: str, env: dict[str, str] | None = None, state_dir: Path = state
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*IMGSERVE, *argv, "--state-dir", str(state_dir), "--host", "127.0.0.1"],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=90,
        )

    yield run_cli
    if (state / "imgserve.pid").exists():
        run_cli("stop")


def hide_arq(tmp_path: Path) -> dict[str, str]:
    """A PYTHONPATH shim whose ``arq`` fails to import, as when the redis extra is missing."""
    shim = tmp_path / "shim" / "arq"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named arq')\n")
    path = os.pathsep.join(p for p in (str(shim.parent), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def test_start_without_redis_extra_says_which_extra(run: Any, tmp_path: Path) -> None:
    """--queue redis:// without arq: start prints the extra to install, before detaching."""
    result = run("start", "--queue", "redis://127.0.0.1:1/0", env=hide_arq(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "imgserve: the Redis queue needs the 'redis' extra: pip install 'imgserve[redis]'"
    )
    assert not (tmp_path / "state" / "imgserve.startup.log").exists()  # no child was started


def test_serve_without_redis_extra_fails_with_a_reason(run: Any, tmp_path: Path) -> None:
    """The foreground `serve` runs the same checks and prints one line, no traceback."""
    result = run("serve", "--queue", "redis://127.0.0.1:1/0", env=hide_arq(tmp_path))
    assert result.returncode == 1
    assert "pip install 'imgserve[redis]'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("amqp://h/0", "imgserve: unsupported queue URL 'amqp://h/0' (use redis://host:port/db)"),
        (
            "redis://u:secret@h:notaport/0",
            "imgserve: bad queue URL redis://u:***@h:notaport/0: "
            "Port could not be cast to integer value as 'notaport'",
        ),
    ],
)
def test_start_with_bad_queue_url_says_so(run: Any, url: str, reason: str) -> None:
    """An unsupported or malformed queue URL is refused by start, its password hidden."""
    result = run("start", "--queue", url)
    assert (result.returncode, result.stderr.strip()) == (1, reason)


def test_start_with_bad_setting_names_it(run: Any, tmp_path: Path) -> None:
    """A setting in the wrong section or of the wrong type: exit 2 naming the key."""
    toml = tmp_path / "c.toml"
    toml.write_text("[worker]\nport = 1\n")
    result = run("start", "--config", str(toml))
    assert result.returncode == 2
    assert "'port' is not a [worker] setting" in result.stderr
    result = run("start", env={"IMGSERVE_JOB_TIMEOUT_S": "soon"})
    assert result.returncode == 2
    assert "worker.job_timeout_s: expected a finite number, got 'soon'" in result.stderr


def test_start_with_unwritable_state_dir_says_so(run: Any, tmp_path: Path) -> None:
    """A state dir that cannot be created (its parent is a file) is reported, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run("start", state_dir=blocker / "state")
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"imgserve: cannot write to {blocker / 'state'}: Not a directory"
    )


def test_start_on_a_port_in_use_says_so(run: Any) -> None:
    """The detached child's bind failure reaches start's stderr as one line."""
    port = free_port()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run("start", "--port", str(port), "--workers", "1")
    assert result.returncode == 1
    assert result.stderr.strip() == f"imgserve: cannot listen on 127.0.0.1:{port}: address in use"


def test_start_child_failure_is_one_line_and_logged(run: Any, tmp_path: Path) -> None:
    """A failure inside the detached daemon (a corrupt job database) is one line on the
    terminal; the traceback goes to the log file only."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "jobs.db").write_bytes(b"not a database " * 64)
    result = run("start", "--port", str(free_port()), "--workers", "1")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "imgserve: cannot start: QueueUnavailable: job database: file is not a database"
    )
    log = (state / "imgserve.log").read_text()
    assert "Traceback" in log and "file is not a database" in log
    assert not (state / "imgserve.pid").exists()


def test_worker_without_redis_extra_says_which_extra(run: Any, tmp_path: Path) -> None:
    """`imgserve worker` checks its queue backend first too: one line, exit 1."""
    result = run("worker", "--queue", "redis://127.0.0.1:1/0", env=hide_arq(tmp_path))
    assert result.returncode == 1
    assert "pip install 'imgserve[redis]'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--webhook-secret", "whsec_c2VjcmV0LWtleS1ieXRlcw=="],
        ["--webhook-secret=whsec_c2VjcmV0LWtleS1ieXRlcw=="],
        ["--webhook-secre", "whsec_c2VjcmV0LWtleS1ieXRlcw=="],  # not a prefix of another flag
    ],
)
def test_a_webhook_secret_on_the_command_line_is_refused_unseen(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret in argv (visible in ps) is refused with exit 2, and the error never
    shows it; a prefix is not taken for --webhook-secrets-file."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["start", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "c2VjcmV0" not in err
    assert "secrets-file" in err or "unrecognized" in err


def test_a_webhook_secret_in_a_set_assignment_is_refused_unseen(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--set webhook_secrets=... (argv again) is refused with exit 2, the value unseen."""
    assert cli.main(["start", "--set", "webhook_secrets=whsec_c2VjcmV0LWtleS1ieXRlcw=="]) == 2
    err = capsys.readouterr().err
    assert "c2VjcmV0" not in err and "process list" in err
