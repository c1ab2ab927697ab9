#!/usr/bin/env bash
# Build Kubernetes 1.20.2 binaries from Debian bookworm's `kubernetes` source package and cache them.
#
#   scripts/build-k8s.sh                   the five a real node needs (apiserver, kubelet, scheduler,
#                                          controller-manager, proxy) + a static `pause`, in ONE make
#   scripts/build-k8s.sh kube-apiserver    only the apiserver (the quick playground's needs)
#
# Why: the e2e tests and `modelcache dev up [--real-node]` need real Kubernetes, and only the Debian,
# PyPI and npm registries are reachable from CI. Debian ships the vendored 1.20.2 tree; it builds with
# Debian's Go once the vendored modern-go/reflect2 1.0.1 (crashes under Go >= 1.18) is swapped for
# Debian's 1.0.2. `pause` (the pod sandbox) is `gcc -static` of the tree's build/pause/linux/pause.c.
# Nothing from the kubernetes source ends up in this repository.
#
# The cache ($OUT_DIR) is keyed by $OUT_DIR/build.key: the recipe version and the set of binaries
# built together. A cache holding fewer binaries than asked for (e.g. the apiserver-only cache of
# earlier versions, which has no key) is rebuilt with all of them in one `make`: sharing one build
# costs little more than the apiserver alone. Idempotent; serialised by flock. Root, or sudo for apt.
#
# Env:
#   MODELCACHE_K8S_DIR          where the binaries go (default: ~/.cache/modelcache/k8s)
#   MODELCACHE_DEBIAN_MIRROR    mirror for the deb-src entry (default: http://deb.debian.org/debian)
#   MODELCACHE_K8S_KEEP_BUILD=1 keep the temporary build tree (for debugging)
#   MODELCACHE_K8S_FORCE=1      rebuild even if cached
set -euo pipefail

OUT_DIR="${MODELCACHE_K8S_DIR:-$HOME/.cache/modelcache/k8s}"
MIRROR="${MODELCACHE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SRC_LIST=/etc/apt/sources.list.d/modelcache-bookworm-src.sources
RECIPE=2
ALL=(kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy)
BUILD_PACKAGES=(golang-go golang-github-modern-go-reflect2-dev dpkg-dev make rsync jq xz-utils util-linux gcc libc6-dev)
RUN_PACKAGES=(etcd-server)
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2

log() { printf '[build-k8s] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

want=("$@")
((${#want[@]})) || want=("${ALL[@]}")
if [[ " ${want[*]} " == *" kubelet "* ]]; then
  # What the real node runs besides our binaries (`modelcache dev up --real-node`).
  RUN_PACKAGES+=(containerd runc containernetworking-plugins iptables conntrack dnsmasq-base)
fi
for w in "${want[@]}"; do
  [[ " ${ALL[*]} " == *" $w "* ]] || die "unknown binary '$w' (one of: ${ALL[*]})"
done
# What one make builds: everything asked for, plus whatever the cache already holds (kept together).
key_line() { printf 'recipe=%s binaries=%s\n' "$RECIPE" "$*"; }
cached_binaries() { sed -n 's/^recipe='"$RECIPE"' binaries=//p' "$OUT_DIR/build.key" 2>/dev/null || true; }
is_cached() {
  [[ "${MODELCACHE_K8S_FORCE:-0}" == 1 ]] && return 1
  local have w
  have=" $(cached_binaries) "
  if [[ "$have" == "  " && -x "$OUT_DIR/kube-apiserver" ]]; then
    have=" kube-apiserver "  # an apiserver-only cache from before build.key existed
  fi
  for w in "${want[@]}"; do
    [[ "$have" == *" $w "* && -x "$OUT_DIR/$w" ]] || return 1
  done
  if [[ " ${want[*]} " == *" kubelet "* ]]; then [[ -x "$OUT_DIR/pause" ]] || return 1; fi
  return 0
}

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
ensure_packages() {
  local missing=() p
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  if ((${#missing[@]})); then
    apt_update
    log "apt-get install ${missing[*]}"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
}

# A restored binary cache on a fresh machine still needs the run-time package (etcd).
if is_cached; then
  ensure_packages "${RUN_PACKAGES[@]}"
  log "already built: ${want[*]} in $OUT_DIR"
  exit 0
fi

# --- 1. packages ---------------------------------------------------------------------------------
ensure_packages "${BUILD_PACKAGES[@]}" "${RUN_PACKAGES[@]}"
[[ -f "$REFLECT2_SRC/reflect2.go" ]] || die "$REFLECT2_SRC missing (golang-github-modern-go-reflect2-dev)"
reflect2_version="$(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
reflect2_version="${reflect2_version%%-*}"   # 1.0.2-2 -> 1.0.2
dpkg --compare-versions "$reflect2_version" ge 1.0.2 || die "reflect2 $reflect2_version < 1.0.2"

# Serialise concurrent runs (two CI jobs on one machine); re-check after taking the lock.
mkdir -p "$OUT_DIR"
exec 9>"$OUT_DIR/.build.lock"
flock 9
if is_cached; then
  log "built by a concurrent run: ${want[*]}"
  exit 0
fi
# Build the union of what is asked and what is cached, so one key describes the whole directory.
build=()
for w in "${ALL[@]}"; do
  if [[ " ${want[*]} " == *" $w "* || " $(cached_binaries) " == *" $w "* ]]; then build+=("$w"); fi
done

# --- 2. deb-src for bookworm ---------------------------------------------------------------------
has_source() {
  # Captured, not piped into grep -q: an early-exiting grep would SIGPIPE apt-cache under pipefail.
  local out
  out="$(apt-cache showsrc kubernetes 2>/dev/null || true)"
  grep -q '^Version: .*1\.20\.2' <<<"$out"
}
has_source || apt_update
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

# --- 5. build (as debian/rules does), all binaries in one make -----------------------------------
export GOPATH="$src/.go"
export GOCACHE="$BUILD_DIR/go-build-cache"  # hack/lib/golang.sh sets its own; harmless
export CGO_ENABLED=0
export PATH="/usr/lib/go/bin:$PATH"
mkdir -p .go/src/k8s.io
[[ -L .go/src/k8s.io/kubernetes ]] || ln -s ../../.. .go/src/k8s.io/kubernetes
what=""
for b in "${build[@]}"; do what+="cmd/$b "; done
log "make WHAT='${what% }' ($(go version | cut -d' ' -f3), $(nproc) cores; takes minutes)"
start=$SECONDS
env HOME="$BUILD_DIR/home" make WHAT="${what% }" >"$BUILD_DIR/make.log" 2>&1 || {
  tail -n 60 "$BUILD_DIR/make.log" >&2
  die "make failed (full log: $BUILD_DIR/make.log; set MODELCACHE_K8S_KEEP_BUILD=1 to keep it)"
}
log "built ${build[*]} in $((SECONDS - start))s"
if [[ " ${build[*]} " == *" kubelet "* ]]; then
  gcc -Os -static -o _output/bin/pause build/pause/linux/pause.c -DVERSION=v1.20.2-modelcache \
    || die "gcc -static pause.c failed (libc6-dev installed?)"
  build+=(pause)
fi

# --- 6. install atomically -----------------------------------------------------------------------
version_out="$(_output/bin/kube-apiserver --version 2>/dev/null || _output/bin/"${build[0]}" --version)"
[[ "$version_out" == *v1.20.2* ]] || die "unexpected version: $version_out"
rm -f "$OUT_DIR/build.key"
for b in "${build[@]}"; do
  [[ -x "_output/bin/$b" ]] || die "no binary at _output/bin/$b"
  cp -L "_output/bin/$b" "$OUT_DIR/.$b.$$"
  chmod 0755 "$OUT_DIR/.$b.$$"
  mv -f "$OUT_DIR/.$b.$$" "$OUT_DIR/$b"
done
printf '%s\nsource: %s\nreflect2: %s\n' "$version_out" "${src##*/}" "$reflect2_version" \
  >"$OUT_DIR/kube-apiserver.version"
binaries=("${build[@]}")
for i in "${!binaries[@]}"; do [[ ${binaries[$i]} == pause ]] && unset 'binaries[i]'; done
key_line "${binaries[@]}" >"$OUT_DIR/build.key"
log "installed ${build[*]} in $OUT_DIR ($version_out)"
