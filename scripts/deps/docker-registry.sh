#!/usr/bin/env bash
# The OCI source's test registry: Debian's docker-registry (distribution v2) binary, run by the tests
# with their own config on 127.0.0.1 (the packaged system service is never used), plus apache2-utils
# for `htpasswd -B` (the registry's htpasswd auth accepts bcrypt hashes only). Idempotent.
set -euo pipefail
need=()
[ -x /usr/bin/docker-registry ] || need+=(docker-registry)
command -v htpasswd >/dev/null || need+=(apache2-utils)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  # policy-rc.d 101: the package's postinst must not start the system registry service on :5000.
  policy=/usr/sbin/policy-rc.d
  created=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" || {
    [ -n "$created" ] && $SUDO rm -f "$policy"
    exit 1
  }
  [ -n "$created" ] && $SUDO rm -f "$policy"
fi
exit 0
