#!/usr/bin/env bash
# Install the Debian packages the test suite needs beyond Python: Chromium for the dashboard's
# headless-browser test, and libfaketime (package `faketime`) for the tests that run a process
# with a skewed clock. A no-op when they are present; without root it only says what is missing.
set -euo pipefail

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-dejavu-core)
compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || missing+=(faketime)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing: run 'apt-get install -y ${missing[*]}' as root" >&2
  exit 0
fi
echo "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
