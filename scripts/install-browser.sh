#!/usr/bin/env bash
# The browser tests/demo/test_browser.py drives: Debian's headless Chromium and its ChromeDriver
# (fonts-liberation: readable text in the screenshot without chromium's other recommends).
# Run by `make test` (and so by CI, .ci/run) before pytest. Already installed: does nothing.
# Otherwise installs them with apt-get (as root, or through passwordless sudo); nothing is
# downloaded at test time. When that is not possible: one error line and exit 1, or, with
# FEDREC_ALLOW_NO_BROWSER=1 (the test then skips), one note and exit 0.
set -euo pipefail

[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && exit 0

fail() {
    if [ "${FEDREC_ALLOW_NO_BROWSER:-}" = 1 ]; then
        echo "install-browser: note: $1; tests/demo/test_browser.py will skip (FEDREC_ALLOW_NO_BROWSER=1)" >&2
        exit 0
    fi
    echo "install-browser: error: $1; install chromium, chromium-driver and fonts-liberation (Debian/Ubuntu:" \
         "sudo apt-get install chromium chromium-driver fonts-liberation), or set FEDREC_ALLOW_NO_BROWSER=1" \
         "to skip tests/demo/test_browser.py" >&2
    exit 1
}

command -v apt-get >/dev/null || fail "/usr/bin/chromium or /usr/bin/chromedriver is missing and there is no apt-get"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || fail "/usr/bin/chromium or /usr/bin/chromedriver is missing; not root and no sudo"
    sudo -n true 2>/dev/null || fail "/usr/bin/chromium or /usr/bin/chromedriver is missing; sudo asks for a password"
    sudo="sudo -n"
fi
echo "install-browser: installing chromium, chromium-driver and fonts-liberation with apt-get" \
     "(tests/demo/test_browser.py needs them)" >&2
log=$(mktemp)
if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium chromium-driver fonts-liberation; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    fail "apt-get could not install them (log: $log)"
fi
rm -f "$log"
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] \
    || fail "apt-get ran but /usr/bin/chromium or /usr/bin/chromedriver is still missing"
