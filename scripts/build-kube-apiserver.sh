#!/usr/bin/env bash
# Build kube-apiserver 1.20.2 from Debian bookworm's `kubernetes` source package and cache it.
#
# Why: the e2e tests and `modelcache dev up` need a real apiserver, and only Debian/PyPI/npm
# registries are reachable from CI. Debian ships the vendored 1.20.2 tree; it builds with Debian's
# Go (1.19) once the vendored modern-go/reflect2 1.0.1 (crashes under Go >= 1.18) is swapped for
# Debian's 1.0.2. Nothing from the kubernetes source ends up in this repository.
#
# Idempotent: exits at once if the binary is already cached. Run as root on a fresh bookworm
# machine (uses sudo for apt when not root and packages are missing).
#
# Env:
#   MODELCACHE_K8S_DIR          where the binary goes (default: ~/.cache/modelcache/k8s)
#   MODELCACHE_DEBIAN_MIRROR    mirror for the deb-src entry (default: http://deb.debian.org/debian)
#   MODELCACHE_K8S_KEEP_BUILD=1 keep the temporary build tree (for debugging)
#   MODELCACHE_K8S_FORCE=1      rebuild even if the binary exists
set -euo pipefail

OUT_DIR="${MODELCACHE_K8S_DIR:-$HOME/.cache/modelcache/k8s}"
OUT_BIN="$OUT_DIR/kube-apiserver"
MIRROR="${MODELCACHE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SRC_LIST=/etc/apt/sources.list.d/modelcache-bookworm-src.sources
APT_PACKAGES=(golang-go etcd-server golang-github-modern-go-reflect2-dev dpkg-dev make rsync jq xz-utils util-linux)
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2

log() { printf '[build-kube-apiserver] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ -x "$OUT_BIN" && -x /usr/bin/etcd && "${MODELCACHE_K8S_FORCE:-0}" != 1 ]]; then
  log "already built: $OUT_BIN"
  exit 0
fi

SUDO=()
if [[ "$(id -u)" != 0 ]]; then
  command -v sudo >/dev/null || die "not root and no sudo: run as root"
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_update() {
  if [[ $apt_updated == 0 ]]; then
    log "apt-get update"
    "${SUDO[@]}" apt-get update -qq
    apt_updated=1
  fi
}
installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }

# A restored binary cache on a fresh machine still needs the runtime package (etcd).
if [[ -x "$OUT_BIN" && "${MODELCACHE_K8S_FORCE:-0}" != 1 ]]; then
  if ! installed etcd-server; then
    apt_update
    log "apt-get install etcd-server (binary already cached)"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends etcd-server >&2
  fi
  log "already built: $OUT_BIN"
  exit 0
fi

# --- 1. packages ---------------------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt_update
  log "apt-get install ${missing[*]}"
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
[[ -f "$REFLECT2_SRC/reflect2.go" ]] || die "$REFLECT2_SRC missing (golang-github-modern-go-reflect2-dev)"
reflect2_version="$(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
reflect2_version="${reflect2_version%%-*}"   # 1.0.2-2 -> 1.0.2
dpkg --compare-versions "$reflect2_version" ge 1.0.2 || die "reflect2 $reflect2_version < 1.0.2"

# Serialise concurrent runs (two CI jobs on one machine); re-check after taking the lock.
mkdir -p "$OUT_DIR"
exec 9>"$OUT_DIR/.build.lock"
flock 9
if [[ -x "$OUT_BIN" && "${MODELCACHE_K8S_FORCE:-0}" != 1 ]]; then
  log "built by a concurrent run: $OUT_BIN"
  exit 0
fi

# --- 2. deb-src for bookworm ---------------------------------------------------------------------
has_source() {
  # Captured, not piped into grep -q: an early-exiting grep would SIGPIPE apt-cache under pipefail.
  local out
  out="$(apt-cache showsrc kubernetes 2>/dev/null || true)"
  grep -q '^Version: .*1\.20\.2' <<<"$out"
}
if ! has_source; then
  apt_update
fi
if ! has_source; then
  log "adding deb-src entry $SRC_LIST"
  "${SUDO[@]}" tee "$SRC_LIST" >/dev/null <<EOF
Types: deb-src
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt_updated=0
  apt_update
  has_source || die "apt-cache showsrc kubernetes finds no 1.20.2 source (is this bookworm?)"
fi

# --- 3. fetch source -----------------------------------------------------------------------------
BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/modelcache-k8s-build.XXXXXX")"
cleanup() {
  if [[ "${MODELCACHE_K8S_KEEP_BUILD:-0}" == 1 ]]; then
    log "build tree kept at $BUILD_DIR"
  else
    # Go's module/build caches are read-only files; make them writable before removing.
    chmod -R u+w "$BUILD_DIR" 2>/dev/null || true
    rm -rf "$BUILD_DIR"
  fi
}
trap cleanup EXIT
cd "$BUILD_DIR"
log "apt-get source kubernetes (in $BUILD_DIR)"
apt-get source -qq kubernetes >"$BUILD_DIR/apt-source.log" 2>&1 || {
  cat "$BUILD_DIR/apt-source.log" >&2
  die "apt-get source kubernetes failed"
}
src=""
for d in "$BUILD_DIR"/kubernetes-*; do [[ -d "$d" ]] && src="$d"; done
[[ -n "$src" && -d "$src/cmd/kube-apiserver" ]] || die "no kubernetes source tree in $BUILD_DIR"
case "$src" in *1.20.2*) ;; *) die "unexpected kubernetes source version: ${src##*/}" ;; esac
cd "$src"

# --- 4. swap vendored reflect2 for Debian's ------------------------------------------------------
log "vendoring modern-go/reflect2 $reflect2_version from $REFLECT2_SRC"
rm -rf vendor/github.com/modern-go/reflect2
cp -rL "$REFLECT2_SRC" vendor/github.com/modern-go/reflect2
find vendor/github.com/modern-go/reflect2 -name '*_test.go' -delete
sed -i "s#github.com/modern-go/reflect2 v1\.0\.1#github.com/modern-go/reflect2 v$reflect2_version#g" \
  vendor/modules.txt go.mod
grep -q "github.com/modern-go/reflect2 v$reflect2_version" vendor/modules.txt \
  || die "vendor/modules.txt not updated"

# --- 5. build (as debian/rules does) -------------------------------------------------------------
export GOPATH="$src/.go"
export GOCACHE="$BUILD_DIR/go-build-cache"
export CGO_ENABLED=0
export PATH="/usr/lib/go/bin:$PATH"
mkdir -p .go/src/k8s.io
[[ -L .go/src/k8s.io/kubernetes ]] || ln -s ../../.. .go/src/k8s.io/kubernetes
log "make WHAT=cmd/kube-apiserver ($(go version | cut -d' ' -f3), $(nproc) cores; takes minutes)"
start=$SECONDS
env HOME="$BUILD_DIR/home" make WHAT=cmd/kube-apiserver >"$BUILD_DIR/make.log" 2>&1 || {
  tail -n 60 "$BUILD_DIR/make.log" >&2
  die "make failed (full log: $BUILD_DIR/make.log; set MODELCACHE_K8S_KEEP_BUILD=1 to keep it)"
}
log "built in $((SECONDS - start))s"

built="$src/_output/bin/kube-apiserver"
[[ -x "$built" ]] || die "no binary at $built"
version_out="$("$built" --version)"
[[ "$version_out" == *v1.20.2* ]] || die "unexpected version: $version_out"

# --- 6. install atomically -----------------------------------------------------------------------
tmp_bin="$OUT_DIR/.kube-apiserver.$$"
cp -L "$built" "$tmp_bin"
chmod 0755 "$tmp_bin"
mv -f "$tmp_bin" "$OUT_BIN"
printf '%s\nsource: %s\nreflect2: %s\n' "$version_out" "${src##*/}" "$reflect2_version" >"$OUT_DIR/kube-apiserver.version"
log "installed $OUT_BIN ($version_out)"
