#!/usr/bin/env bash
# kube-apiserver alone (the quick playground's needs); see scripts/build-k8s.sh, which does the work
# and builds every binary a real node needs when called without arguments (`make k8s`).
set -euo pipefail
exec bash "$(dirname "$0")/build-k8s.sh" kube-apiserver
