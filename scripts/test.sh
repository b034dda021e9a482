#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then
# runs lint (ruff), types (mypy) and pytest. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: a real Redis server and real image corpora.
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ -d /usr/share/desktop-base ] || need+=(desktop-base)
[ -d /usr/share/wallpapers/Next ] || need+=(plasma-workspace-wallpapers)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing Debian packages: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "missing Debian packages: ${need[*]} (run: sudo apt-get install ${need[*]})" >&2
        exit 1
    fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
