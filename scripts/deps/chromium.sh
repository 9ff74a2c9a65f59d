#!/usr/bin/env bash
# Headless Chromium for the loadgen HTML report test
# (loadgen/tests/report_browser.rs): installs Debian's `chromium` package only
# when /usr/bin/chromium is missing. Needs root, or sudo (GitHub's runners).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "deps: installing chromium (Debian package) for the HTML report test" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq >&2
"${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium >&2
