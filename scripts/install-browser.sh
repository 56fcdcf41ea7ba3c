#!/usr/bin/env bash
# Debian's Chromium for the web page's end-to-end test (tests/test_page_browser.py), which
# Playwright's Python package drives; Playwright's own browser download is not used.
# Does nothing when chromium is already there. Where it cannot be installed (not root, no
# apt) it says so and the browser test is skipped; nothing else depends on it.
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: chromium is missing and cannot be installed here (needs root and apt-get);" \
         "the browser test will be skipped" >&2
    exit 0
fi
echo "install-browser: installing Debian's chromium (for the web page's browser test)" >&2
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null \
        || echo "install-browser: apt-get could not install chromium; the browser test will be skipped" >&2
fi
exit 0
