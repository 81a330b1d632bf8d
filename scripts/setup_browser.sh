#!/usr/bin/env bash
# Installs Debian's chromium for the web-page test (tests/test_web_browser.py drives it with Playwright through
# executable_path; Playwright's own browser download is never used). Never fails the run: without chromium the
# browser test skips, and this script says why.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ] && ! command -v sudo >/dev/null 2>&1; then
  echo "setup_browser: chromium is missing and this user cannot apt-get install it; the browser test will be skipped" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" = "0" ] || SUDO="sudo -n"
if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; then
  echo "setup_browser: installed $(/usr/bin/chromium --version 2>/dev/null | head -1)"
else
  echo "setup_browser: could not install chromium with apt-get; the browser test will be skipped" >&2
fi
exit 0
