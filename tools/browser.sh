#!/usr/bin/env bash
# Make a headless browser available to tests/test_web_chat.py: Debian's chromium and chromium-driver (the system
# binaries; nothing is downloaded by Selenium or Playwright). Idempotent: a second run only checks and says so.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "browser.sh: chromium and chromedriver already installed ($(chromium --version 2>/dev/null | head -n 1))"
elif [ "$(id -u)" -ne 0 ]; then
    echo "browser.sh: chromium or chromedriver missing; as root this installs them (apt-get install chromium" \
         "chromium-driver)"
elif ! command -v apt-get >/dev/null; then
    echo "browser.sh: chromium or chromedriver missing and no apt-get here: install them with your package manager"
else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    echo "browser.sh: installed $(chromium --version 2>/dev/null | head -n 1) and chromedriver with apt-get"
fi
