#!/usr/bin/env bash
# Install the Debian packages tests and benchmarks need, only when missing (CI starts from a fresh machine).
set -euo pipefail
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v aria2c >/dev/null || need+=(aria2)
command -v curl >/dev/null || need+=(curl)
command -v hyperfine >/dev/null || need+=(hyperfine)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# Each test server or tool that needs system packages has its own idempotent installer here.
for f in "$(dirname "$0")"/deps/*.sh; do
  [ -e "$f" ] && bash "$f"
done
exit 0
