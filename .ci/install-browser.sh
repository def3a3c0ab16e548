#!/usr/bin/env bash
# Installs what tests/test_viewer.py needs to open the viewer page in a real browser: Debian's
# chromium and chromium-driver (apt, as root) and the Python driver selenium (pip, into .venv).
# Idempotent, never downloads a browser build, and always exits 0: when something cannot be
# installed it says why, and the browser tests skip with that reason.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VIEWER_PYTHON:-$ROOT/.venv/bin/python}"
SELENIUM_SPEC="${SELENIUM_SPEC:-selenium>=4.20,<5}"

say() { echo "install-browser: $*"; }

have_browser() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

install_debian() {
    if have_browser; then
        say "chromium $(chromium --version 2>/dev/null | awk '{print $2}') and chromedriver already installed"
        return 0
    fi
    if [ "$(id -u)" != "0" ]; then
        say "not root: cannot apt-get install chromium chromium-driver (browser tests will skip)"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get on this machine: install chromium and chromedriver by hand (browser tests will skip)"
        return 0
    fi
    # refresh the package lists only when the candidate is unknown (apt-get update is slow)
    if ! apt-cache policy chromium-driver 2>/dev/null | grep -q "Candidate: [0-9]"; then
        say "chromium-driver not in the package lists: apt-get update"
        apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed"
    fi
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium chromium-driver >/dev/null 2>&1; then
        say "installed chromium $(chromium --version 2>/dev/null | awk '{print $2}') and chromium-driver"
    else
        say "apt-get install chromium chromium-driver failed (browser tests will skip)"
    fi
}

install_python_driver() {
    if [ ! -x "$PY" ]; then
        say "no Python at $PY (run make setup first): selenium not installed (browser tests will skip)"
        return 0
    fi
    if "$PY" -c "import selenium" >/dev/null 2>&1; then
        say "selenium $("$PY" -c 'import selenium; print(selenium.__version__)') already installed"
        return 0
    fi
    if "$PY" -m pip install -q "$SELENIUM_SPEC" >/dev/null 2>&1; then
        say "installed selenium $("$PY" -c 'import selenium; print(selenium.__version__)')"
    else
        say "pip install '$SELENIUM_SPEC' failed (browser tests will skip)"
    fi
}

install_debian
install_python_driver
exit 0
