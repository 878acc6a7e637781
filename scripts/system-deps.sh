#!/usr/bin/env bash
# Install the Debian packages the test suite needs beyond Python: Chromium for the dashboard's
# headless-browser test. A no-op when they are present; without root it only says what is missing.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium is missing: run 'apt-get install -y chromium' as root" >&2
  exit 0
fi
echo "installing chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
