#!/usr/bin/env bash
# Installs Debian's `prometheus` package (promtool + the prometheus server binary) when either is
# missing. The deployment tests run both binaries; the package's own service is not started.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# The package's maintainer script would start a system-wide prometheus on :9090 where an init
# system runs; the tests start their own on a free port, so keep the service down during the
# install unless the machine already has a policy (Debian's documented policy-rc.d mechanism).
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
fi

start=$(date +%s)
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
echo "installed prometheus $(prometheus --version 2>&1 | head -n1 | awk '{print $3}') in $(( $(date +%s) - start ))s"
