#!/usr/bin/env bash
# `make image`: the modelcache image as a docker-archive tar (dist/modelcache-image.tar), built offline
# from Debian packages and our wheel; see scripts/build_image.py. Installs mmdebstrap when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v mmdebstrap >/dev/null; then
	echo "[build-image] apt-get install mmdebstrap" >&2
	$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null
fi
exec $SUDO .venv/bin/python scripts/build_image.py "$@"
