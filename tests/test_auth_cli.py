"""``imgserve keys add`` and ``imgserve keys list`` in-process, and API keys kept off argv."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest

from imgserve import auth, cli


def add(capsys: pytest.CaptureFixture[str], keys: Path, *args: str) -> tuple[int, str, str]:
    code = cli.main(["keys", "add", *args, "--keys", str(keys)])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_prints_the_key_once_and_stores_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """stdout is the new key alone; the file (created 0600) holds its sha256 and scopes."""
    keys = tmp_path / "sub" / "keys.toml"
    code, out, err = add(
        capsys, keys, "alice", "--destinations", "s3://media/u/*", "--rate", "2", "--admin"
    )
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("isk_") and len(out.splitlines()) == 1
    assert "only time" in err and secret not in err
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    text = keys.read_text()
    assert secret not in text
    (entry,) = tomllib.loads(text)["keys"]
    assert entry == {
        "name": "alice",
        "secret_sha256": auth.hash_secret(secret),
        "destinations": ["s3://media/u/*"],
        "rate": 2.0,
        "admin": True,
    }
    assert auth.load_keys(keys, {}).verify(secret).name == "alice"


def test_add_appends_and_refuses_what_the_loader_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second key is appended (comments kept); a name used twice or a bad pattern
    leaves the file as it was and prints no key."""
    keys = tmp_path / "keys.toml"
    keys.write_text("# operators: see docs/security.md\n")
    assert add(capsys, keys, "a")[0] == 0
    assert add(capsys, keys, "b", "--sources", "https://cdn.example.com/")[0] == 0
    before = keys.read_text()
    assert before.startswith("# operators")
    for args, why in (
        (["a"], "used twice"),
        (["c", "--destinations", "https://h/?q=1"], "query"),
        (["bad name"], "name"),
        (["d", "--burst", "3"], "burst: needs a rate"),
    ):
        code, out, err = add(capsys, keys, *args)
        assert (code, out) == (1, ""), err
        assert why in err
        assert keys.read_text() == before
    names = [k.name for k in auth.load_keys(keys, {}).keys]
    assert names == ["a", "b"]


def test_list_shows_names_and_scopes_never_hashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line per key: name, admin, scopes, limits, whether it has its own webhook secret."""
    keys = tmp_path / "keys.toml"
    add(capsys, keys, "up", "--destinations", "file:///srv/thumbs/", "--max-outputs", "3")
    add(capsys, keys, "ops", "--admin", "--webhook-secret-env", "OPS_WEBHOOK_SECRET")
    assert cli.main(["keys", "list", "--keys", str(keys)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == 'up  destinations=["file:///srv/thumbs/"]  max_outputs=3'
    assert lines[1] == "ops (admin)  webhook_secret=true"
    for entry in tomllib.loads(keys.read_text())["keys"]:
        assert entry["secret_sha256"] not in out


def test_keys_default_to_the_state_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --keys, the keys file is keys.toml in the state directory (what serve reads)."""
    assert cli.main(["keys", "add", "k", "--state-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert [k.name for k in auth.load_keys(tmp_path / "keys.toml", {}).keys] == ["k"]


def test_a_key_on_the_command_line_is_never_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    """An API key typed as an argument is masked in argparse's error."""
    secret = auth.new_secret()
    with pytest.raises(SystemExit) as exited:
        cli.main(["start", "--key", secret])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert secret not in err and secret[4:] not in err and "isk_***" in err


def test_keys_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """IMGSERVE_KEYS_FILE sets keys_file (as --keys does)."""
    from imgserve import config, daemon

    monkeypatch.setenv("IMGSERVE_KEYS_FILE", str(tmp_path / "k.toml"))
    settings = config.load({})
    assert daemon.keys_file(settings) == tmp_path / "k.toml"
    assert config.load({"keys": str(tmp_path / "x.toml")}).server.keys_file == tmp_path / "x.toml"


def test_exposure_warning_only_beyond_loopback_without_keys() -> None:
    """0.0.0.0, a LAN address or a name without keys: warned; loopback or keys: not."""
    for host in ("0.0.0.0", "", "::", "192.168.1.10", "imgserve.internal"):
        warning = auth.exposure_warning(host, False)
        assert warning is not None and "docs/security.md" in warning
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert auth.exposure_warning(host, False) is None
    assert auth.exposure_warning("0.0.0.0", True) is None


def test_two_adds_at_once_take_turns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keys add` locks the file while it checks and appends: an add that starts while
    another holds the lock waits for it (seen in /proc/locks), then sees its key, so
    a name added twice at once is refused instead of making the file unreadable."""
    import fcntl
    import threading
    import time

    keys = tmp_path / "keys.toml"
    keys.write_text("")
    inode = keys.stat().st_ino
    results: list[int] = []
    with keys.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        adding = threading.Thread(target=lambda: results.append(add(capsys, keys, "a")[0]))
        adding.start()
        deadline = time.monotonic() + 10
        while not any(
            "->" in line and line.split()[-3].endswith(f":{inode}")
            for line in Path("/proc/locks").read_text().splitlines()
        ):
            assert time.monotonic() < deadline, "the second add never waited for the lock"
            time.sleep(0.01)
        held.write(f'[[keys]]\nname = "a"\nsecret_sha256 = "{auth.hash_secret("x")}"\n')
        held.flush()
    adding.join(10)
    assert results == [1]
    assert [key.name for key in auth.load_keys(keys, {}).keys] == ["a"]
