#!/usr/bin/env bash
# The test command: install into .venv, then run the whole suite (e2e included) on tiny models.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# Debian's prometheus (promtool + the server) for the alert-rule and line-health tests; a policy-rc.d
# (removed again when this added it) keeps apt from starting its service
command -v promtool >/dev/null || { p=/usr/sbin/policy-rc.d; [ -e $p ] && a= || { printf '#!/bin/sh\nexit 101\n' >$p; chmod +x $p; a=1; }; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; rc=$?; [ -z "$a" ] || rm -f $p; [ $rc -eq 0 ] || { echo "installing Debian's prometheus failed" >&2; exit 1; }; }
# Debian's chromium and its driver for the inspection page's browser test (Selenium; no browser download)
command -v chromedriver >/dev/null && command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null || { echo "installing Debian's chromium and chromium-driver failed" >&2; exit 1; }; }
# Debian's firefox-esr for the same page in Firefox, driven over Marionette (marionette-driver; no geckodriver)
command -v firefox-esr >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends firefox-esr >/dev/null || { echo "installing Debian's firefox-esr failed" >&2; exit 1; }; }
export GX_ANALYTICS_ENABLED=false MLFLOW_ENABLE_ASYNC_LOGGING=false RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -m pytest -p no:cacheprovider --timeout=900 --durations=30 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
