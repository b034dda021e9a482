"""Installing the Debian packages the benchmark needs, when missing and run as root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


class MissingPackages(RuntimeError):
    """Debian packages are missing and cannot be installed from here."""


def installed(package: str) -> bool:
    """Whether dpkg reports ``package`` as installed."""
    if shutil.which("dpkg-query") is None:
        return False
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode == 0 and "install ok installed" in done.stdout


def ensure(packages: list[str], why: str) -> None:
    """Install the missing ones of ``packages`` with apt-get (root only)."""
    missing = [p for p in packages if not installed(p)]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise MissingPackages(
            f"{why} needs the Debian packages {' '.join(missing)}; install them with "
            f"`apt-get install {' '.join(missing)}` as root, or run the benchmark as root"
        )
    print(f"[bench] apt-get install {' '.join(missing)} ({why})", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        # A stale package list is the usual cause; refresh once and retry.
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MissingPackages(f"apt-get install {' '.join(missing)} failed:\n{done.stderr[-2000:]}")
