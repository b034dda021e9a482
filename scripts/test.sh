#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then
# runs lint (ruff) and types (mypy) once and pytest on every supported Python.
# CI runs exactly this (.ci/run). Arguments go to pytest.
#
# pytest runs in two passes per interpreter: the tests in parallel with
# pytest-xdist (TEST_WORKERS processes, 4 by default: most slow tests wait on
# daemons, leases and slow sources rather than compute, so 4 fit 2 cores), then
# the tests marked `serial` (they measure speed) alone. Interpreters go one
# after the other: run together they oversubscribe 2 cores and were slower.
# TEST_WORKERS=0 runs everything in one plain pytest process, as `pytest` does
# when run by hand (-n is set here, not in addopts).
#
# Interpreters: PYTHONS="3.11 3.13" by default, each entry a version (looked up
# as pythonX.Y on PATH, then in pyenv's versions directory) or a command or path
# (PYTHONS="/usr/bin/python3.12"). Each gets its own venv, .venv-X.Y, except
# that the first uses .venv when that is free or made with the same version.
# A required interpreter that cannot be found fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: a real Redis server, a real Prometheus (it
# scrapes a test daemon's /metrics), a real browser (Playwright drives Debian's
# Chromium through the dashboard, tests/e2e/test_ui.py: Playwright's own browser
# download needs a network) and real image corpora.
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-liberation)
[ -d /usr/share/desktop-base ] || need+=(desktop-base)
[ -d /usr/share/wallpapers/Autumn ] || need+=(plasma-workspace-wallpapers)
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

# "X.Y" of an interpreter, or nothing if it does not run (a pyenv shim for a
# version that is not active exits 127).
version_of() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

# The real executable for an entry of PYTHONS; exits the script if there is none.
find_python() {
    local want=$1 candidate
    if [[ ! $want =~ ^[0-9]+\.[0-9]+$ ]]; then
        if [ -n "$(version_of "$want")" ]; then
            "$want" -c 'import sys; print(sys.executable)'
            return
        fi
        echo "scripts/test.sh: PYTHONS names '$want', which does not run" >&2
        exit 1
    fi
    for candidate in "python$want" "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want".*/bin/python; do
        if [ "$(version_of "$candidate")" = "$want" ]; then
            "$candidate" -c 'import sys; print(sys.executable)'
            return
        fi
    done
    echo "scripts/test.sh: Python $want not found (no working python$want on PATH, nothing" \
        "in ${PYENV_ROOT:-$HOME/.pyenv}/versions/$want.*); install it or set PYTHONS" >&2
    exit 1
}

read -r -a wanted <<<"${PYTHONS:-3.11 3.13}"
venvs=()
for entry in "${wanted[@]}"; do
    python=$(find_python "$entry")
    version=$(version_of "$python")
    # The first interpreter shares .venv with the README's install command,
    # unless that .venv was made with another Python.
    venv=.venv-$version
    if [ ${#venvs[@]} -eq 0 ] && { [ ! -x .venv/bin/python ] ||
        [ "$(version_of .venv/bin/python)" = "$version" ]; }; then
        venv=.venv
    fi
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    echo "Python $version ($python): installing into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
    venvs+=("$venv")
done

"${venvs[0]}/bin/ruff" check src tests bench
"${venvs[0]}/bin/ruff" format --check src tests bench
"${venvs[0]}/bin/mypy"

workers=${TEST_WORKERS:-4}
# One pass of pytest on a venv; 5 (no test selected: the arguments picked no
# serial test, say) is not a failure.
pass_ok() {
    local code=0
    "$@" || code=$?
    [ $code -eq 0 ] || [ $code -eq 5 ]
}

failed=()
for venv in "${venvs[@]}"; do
    version=$("$venv/bin/python" --version)
    if [ "$workers" = 0 ]; then
        echo "pytest on $version ($venv)"
        "$venv/bin/python" -m pytest -q "$@" || failed+=("$version")
        continue
    fi
    echo "pytest on $version ($venv): $workers processes (pytest-xdist)"
    pass_ok "$venv/bin/python" -m pytest -q -n "$workers" --dist worksteal -m "not serial" "$@" ||
        failed+=("$version")
    echo "pytest on $version ($venv): the serial tests, alone"
    pass_ok "$venv/bin/python" -m pytest -q -m serial "$@" || failed+=("$version (serial tests)")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "scripts/test.sh: tests failed on ${failed[*]}" >&2
    exit 1
fi
