#!/usr/bin/env bash
# Azurite (Microsoft's Azure Storage emulator) for the Azure Blob source tests.
# Idempotent: installs the npm package into a cache dir outside the repo only when it is missing.
# Node.js and npm come from Debian when absent (CI runs this as root on a fresh bookworm machine).
set -euo pipefail

DIR="${MODELCACHE_NPM_DIR:-$HOME/.cache/modelcache/npm}"
VERSION="${AZURITE_VERSION:-3.35.0}"  # pinned: CI must not change under us
BIN="$DIR/node_modules/.bin/azurite-blob"

if [ -x "$BIN" ]; then
  echo "azurite: already installed at $BIN"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "azurite: node/npm missing and not root; install nodejs and npm first" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends nodejs npm
fi

mkdir -p "$DIR"
npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error "azurite@$VERSION"
if [ ! -x "$BIN" ]; then
  echo "azurite: npm install finished but $BIN is missing" >&2
  exit 1
fi
echo "azurite: installed at $BIN"
