"""Settings layers: every dataclass field reachable by file and environment, sections honoured,
bad keys and values refused naming the key."""

from __future__ import annotations

import dataclasses
import ipaddress
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imgserve import config
from imgserve.config import SettingsError


def leaf_fields(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, type) below Settings, walked independently of config's own walk."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], (*prefix, f.name))
        else:
            yield (*prefix, f.name), hints[f.name]


FIELDS = list(leaf_fields(config.Settings))
NET8 = ipaddress.ip_network("10.0.0.0/8")
IDS = [".".join(path) for path, _ in FIELDS]


def default_of(path: tuple[str, ...]) -> Any:
    value: Any = config.Settings()
    for part in path:
        value = getattr(value, part)
    return value


def value_at(settings: config.Settings, path: tuple[str, ...]) -> Any:
    value: Any = settings
    for part in path:
        value = getattr(value, part)
    return value


SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _secrets_file(tmp_path: Path) -> tuple[Any, str, Any]:
    (tmp_path / "secrets").write_text(SECRET + "\n")
    return str(tmp_path / "secrets"), str(tmp_path / "secrets"), tmp_path / "secrets"


def _watermarks(tmp_path: Path) -> tuple[Any, str, Any]:
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    pair = f"logo={(tmp_path / 'logo.png').resolve()}"
    return [pair], pair, (pair,)


# Fields whose values are checked beyond their type get samples that pass the check.
CHECKED_SAMPLES: dict[str, Any] = {
    "imaging.watermarks": _watermarks,
    "server.log_format": lambda _: ("json", "json", "json"),
    "webhook.webhook_url": lambda _: (
        "http://h.example/",
        "http://h.example/",
        "http://h.example/",
    ),
    "webhook.webhook_secrets": lambda _: ([SECRET], SECRET, (SECRET,)),
    "webhook.webhook_secrets_file": _secrets_file,
    "webhook.webhook_schedule_s": lambda _: ([0.0, 2.5], "0, 2.5", (0.0, 2.5)),
    "server.metrics_listen": lambda _: ("127.0.0.1:9602", "127.0.0.1:9602", "127.0.0.1:9602"),
    "server.otlp_endpoint": lambda _: (
        "http://collector:4318",
        "http://collector:4318",
        "http://collector:4318",
    ),
}


def sample(path: tuple[str, ...], hint: Any, tmp_path: Path) -> tuple[Any, str, Any]:
    """(TOML value, environment text, expected setting) differing from the default."""
    if ".".join(path) in CHECKED_SAMPLES:
        checked: tuple[Any, str, Any] = CHECKED_SAMPLES[".".join(path)](tmp_path)
        return checked
    default = default_of(path)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        element = args[0]
        if element is Path:
            return [str(tmp_path / "a")], str(tmp_path / "a"), (tmp_path / "a",)
        if ipaddress.IPv4Network in typing.get_args(element):
            net = ipaddress.ip_network("10.9.0.0/16")
            return ["10.9.0.0/16"], "10.9.0.0/16", (net,)
        return ["alpha", "beta"], "alpha, beta", ("alpha", "beta")
    scalar = next((a for a in args if a is not type(None)), hint)
    if scalar is bool:
        return (not default), str(not default).lower(), not default
    if scalar is int:
        number = (default or 0) + 1
        return number, str(number), number
    if scalar is float:
        number = (default or 0.0) + 1.5
        return number, str(number), number
    if scalar is Path:
        return str(tmp_path / "p"), str(tmp_path / "p"), tmp_path / "p"
    if scalar is str:
        return "sample", "sample", "sample"
    raise AssertionError(f"add a sample for {hint!r} ({'.'.join(path)})")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


@pytest.mark.parametrize(("path", "hint"), FIELDS, ids=IDS)
def test_every_field_from_flat_toml(path: tuple[str, ...], hint: Any, tmp_path: Path) -> None:
    """Each dataclass field is settable as a flat TOML key (its canonical name)."""
    toml, _, expected = sample(path, hint, tmp_path)
    name = config.OPTIONS[".".join(path)].names[0]
    file = tmp_path / "c.toml"
    file.write_text(f"{name} = {toml_value(toml)}\n")
    assert value_at(config.load({}, config_file=file, environ={}), path) == expected


@pytest.mark.parametrize(("path", "hint"), FIELDS, ids=IDS)
def test_every_field_from_its_section(path: tuple[str, ...], hint: Any, tmp_path: Path) -> None:
    """Each field is settable under its own [section] (nested ones under [a.b]) by field name."""
    toml, _, expected = sample(path, hint, tmp_path)
    file = tmp_path / "c.toml"
    file.write_text(f"[{'.'.join(path[:-1])}]\n{path[-1]} = {toml_value(toml)}\n")
    assert value_at(config.load({}, config_file=file, environ={}), path) == expected


@pytest.mark.parametrize(("path", "hint"), FIELDS, ids=IDS)
def test_every_field_from_environment(path: tuple[str, ...], hint: Any, tmp_path: Path) -> None:
    """Each field is settable as IMGSERVE_<NAME>, lists comma- (paths colon-) separated."""
    _, text, expected = sample(path, hint, tmp_path)
    var = config.OPTIONS[".".join(path)].env_vars[0]
    assert value_at(config.load({}, environ={var: text}), path) == expected


@pytest.mark.parametrize(("path", "hint"), FIELDS, ids=IDS)
def test_every_field_from_set_flag(path: tuple[str, ...], hint: Any, tmp_path: Path) -> None:
    """Each field is settable with --set section.field=VALUE (the generic flag), but
    secrets, which argv would show to every user of the machine."""
    _, text, expected = sample(path, hint, tmp_path)
    assignment = f"{'.'.join(path)}={text}"
    if ".".join(path) == "webhook.webhook_secrets":
        with pytest.raises(config.SettingsError, match="process list") as refused:
            config.load({}, environ={}, assignments=[assignment])
        assert text not in str(refused.value)
        return
    settings = config.load({}, environ={}, assignments=[assignment])
    assert value_at(settings, path) == expected


@pytest.mark.parametrize(
    ("alias", "key", "text", "toml", "expected"),
    [
        ("home", "server.state_dir", "/srv/s", '"/srv/s"', Path("/srv/s")),
        ("pid", "server.pid_file", "/run/i.pid", '"/run/i.pid"', Path("/run/i.pid")),
        ("logdir", "server.log_dir", "/logs", '"/logs"', Path("/logs")),
        ("queue", "server.queue_url", "redis://h/0", '"redis://h/0"', "redis://h/0"),
        ("worker_nice", "worker.nice", "5", "5", 5),
        ("worker_threads", "worker.threads", "2", "2", 2),
        ("allow_net", "transport.policy.allow_nets", "10.0.0.0/8", '["10.0.0.0/8"]', (NET8,)),
        ("allow_host", "transport.policy.allow_hosts", "A.Ex.", '["A.Ex."]', ("a.ex",)),
        ("file_root", "transport.file_roots", "/a:/b", '["/a", "/b"]', (Path("/a"), Path("/b"))),
        ("redact_param", "server.redact_params", "key, auth", '["key", "auth"]', ("key", "auth")),
    ],
)  # fmt: skip
def test_aliases_in_every_layer(
    alias: str, key: str, text: str, toml: str, expected: Any, tmp_path: Path
) -> None:
    """0.2's and the short names (home, pid, logdir, queue, allow_net, ...) work in every layer."""
    path = tuple(key.split("."))
    env = {"IMGSERVE_" + alias.upper(): text}
    assert value_at(config.load({}, environ=env), path) == expected
    assert value_at(config.load({alias: text}, environ={}), path) == expected
    for table in ("", f"[{'.'.join(path[:-1])}]\n"):
        file = tmp_path / "c.toml"
        file.write_text(f"{table}{alias} = {toml}\n")
        assert value_at(config.load({}, config_file=file, environ={}), path) == expected


def test_policy_keys_under_transport_or_transport_policy(tmp_path: Path) -> None:
    """allow_net/allow_host belong to [transport.policy] and are accepted under [transport] too."""
    file = tmp_path / "c.toml"
    file.write_text(
        '[transport]\nallow_host = ["a.example"]\n[transport.policy]\nallow_net = ["10.0.0.0/8"]\n'
    )
    policy = config.load({}, config_file=file, environ={}).transport.policy
    assert policy.allow_hosts == ("a.example",)
    assert policy.allow_nets == (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[worker]\nport = 1\n", r"'port' is not a \[worker\] setting.*\[server\]"),
        ("[imaging]\nallow_net = []\n", r"'allow_net' is not a \[imaging\] .*\[transport.policy\]"),
        ("[transport.policy]\nfile_root = []\n", r"'file_root' is not a \[transport.policy\] "),
        ("[server]\nprot = 1\n", r"unknown setting 'prot' in \[server\]"),
        ("prot = 1\n", r"unknown setting 'prot' in the top level"),
        ("[srever]\nport = 1\n", r"unknown section \[srever\]"),
        ("[server.port]\nx = 1\n", r"unknown section \[server.port\]"),
        ('port = "x"\n', r"server.port: expected an integer, got 'x' \(port in"),
        ('port = "8602"\n', r"server.port: expected an integer"),
        ("port = 1.5\n", r"server.port: expected an integer, got 1.5"),
        ("port = true\n", r"server.port: expected an integer, got True"),
        ("port = 0\n", r"server.port: must be at least 1"),
        ("port = 65536\n", r"server.port: must be at most 65535"),
        ("[worker]\nworkers = 0\n", r"worker.workers: must be .* 1, got 0 \(\[worker\] workers in"),
        ("job_timeout_s = -1\n", r"worker.job_timeout_s: must be at least 0"),
        ("job_timeout_s = inf\n", r"worker.job_timeout_s: expected a finite number"),
        ("job_timeout_s = nan\n", r"worker.job_timeout_s: expected a finite number"),
        ('host = 1\n', r"server.host: expected a string, got 1"),
        ('allow_net = ["10.0.0.0/33"]\n', r"transport.policy.allow_nets: expected a network"),
        ("allow_net = 7\n", r"transport.policy.allow_nets: expected a list"),
        ('pid = "/a"\npid_file = "/b"\n', r"server.pid_file is set twice"),
        ("port = \n", r"not valid TOML"),
    ],
)  # fmt: skip
def test_bad_toml_refused_naming_the_key(toml: str, message: str, tmp_path: Path) -> None:
    """Wrong section, unknown key, wrong type or out-of-range value: SettingsError naming it."""
    file = tmp_path / "c.toml"
    file.write_text(toml)
    with pytest.raises(SettingsError, match=message):
        config.load({}, config_file=file, environ={})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"IMGSERVE_PORT": "x"}, r"server.port: expected an integer, got 'x' \(IMGSERVE_PORT"),
        ({"IMGSERVE_WORKERS": "0"}, r"worker.workers: must be at least 1"),
        ({"IMGSERVE_JOB_TIMEOUT_S": "soon"}, r"worker.job_timeout_s: expected a finite number"),
        (
            {"IMGSERVE_ALLOW_NET": "10.0.0.0/8,nonsense"},
            r"allow_nets: expected a network.*nonsense",
        ),
        ({"IMGSERVE_PID": "/a", "IMGSERVE_PID_FILE": "/b"}, r"server.pid_file is set twice"),
    ],
)
def test_bad_environment_refused_naming_the_variable(env: dict[str, str], message: str) -> None:
    """A bad IMGSERVE_* value names the setting and the variable it came from."""
    with pytest.raises(SettingsError, match=message):
        config.load({}, environ=env)


@pytest.mark.parametrize("name", ["webhook_url", "otlp_endpoint"])
def test_a_url_that_is_not_http_is_refused_without_its_credentials(name: str) -> None:
    """A webhook URL or OTLP endpoint that is not http(s) is refused with the URL
    redacted: its password and a secret query parameter are not in the message."""
    with pytest.raises(SettingsError, match="expected an http") as refused:
        config.load({name: "ftp://u:s3cret@c/?token=t0ken"}, environ={})
    assert "ftp://u:***@c/?token=***" in str(refused.value)
    assert "s3cret" not in str(refused.value) and "t0ken" not in str(refused.value)


def test_environment_text_forms() -> None:
    """Environment numbers may use underscores; empty variables leave the setting unset."""
    settings = config.load({}, environ={"IMGSERVE_MAX_PIXELS": "1_000_000", "IMGSERVE_PORT": ""})
    assert settings.imaging.max_pixels == 1_000_000
    assert settings.server.port == 8602


def test_set_assignments() -> None:
    """--set takes flat or dotted names, refuses unknown names, missing '=' and doubles."""
    settings = config.load({}, environ={}, assignments=["log_backups=2", "worker.lease_s=7.5"])
    assert (settings.server.log_backups, settings.worker.lease_s) == (2, 7.5)
    with pytest.raises(SettingsError, match="unknown setting 'prot'"):
        config.load({}, environ={}, assignments=["prot=1"])
    with pytest.raises(SettingsError, match="NAME=VALUE"):
        config.load({}, environ={}, assignments=["port"])
    with pytest.raises(
        SettingsError, match=r"server.port is set twice: as --port and as --set port"
    ):
        config.load({"port": 1}, environ={}, assignments=["port=2"])
    with pytest.raises(SettingsError, match=r"server.port: expected an integer.*--set server.port"):
        config.load({}, environ={}, assignments=["server.port=x"])


def test_names_are_unique_and_derived_from_fields() -> None:
    """One option per dataclass field, no name used twice, each alias naming a real field."""
    assert sorted(config.OPTIONS) == sorted(IDS)
    names = [n for o in config.OPTIONS.values() for n in o.names]
    assert len(names) == len(set(names))
    assert {"home", "pid", "logdir", "queue", "allow_net", "worker_nice"} <= set(names)


@dataclass(frozen=True)
class _A:
    timeout_s: float = 1.0
    only_a: int = 1


@dataclass(frozen=True)
class _B:
    timeout_s: float = 2.0


@dataclass(frozen=True)
class _Root:
    a: _A = field(default_factory=_A)
    b: _B = field(default_factory=_B)


def test_field_name_shared_by_two_sections_gets_section_prefixed_flat_names() -> None:
    """A field name two sections share is flat-named section_field, so neither shadows the other."""
    options = config._build_options(_Root, {})
    assert options["a.timeout_s"].names == ("a_timeout_s",)
    assert options["b.timeout_s"].names == ("b_timeout_s",)
    assert options["a.only_a"].env_vars == ("IMGSERVE_ONLY_A",)
