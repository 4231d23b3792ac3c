#!/usr/bin/env bash
# Installs everything the test suite needs on a bare Debian 12 machine with Python >= 3.11
# and Go: mail servers and clients from Debian, the package and its test tools from PyPI,
# and a kube-apiserver/etcd/kubectl/helm built or fetched into a cache outside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

APT_PACKAGES=(dovecot-imapd dovecot-pop3d dovecot-lmtpd postfix msmtp curl ca-certificates chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The packages start system-wide daemons on some images; the tests run their own.
for service in dovecot postfix; do
    $SUDO service "$service" stop >/dev/null 2>&1 || true
done

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

bash tests/k8s/build.sh
