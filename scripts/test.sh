#!/usr/bin/env bash
# Runs every test of Sinter, after installing what the tests need on a fresh
# Debian machine: iproute2 and ethtool (multi-host tests in network namespaces)
# and Python's safetensors + numpy (the checkpoint interop test).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v ethtool >/dev/null 2>&1 || missing+=(ethtool)
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -c 'import safetensors, numpy' 2>/dev/null || python3 -m pip install -q safetensors numpy

cargo test --workspace --release "$@"
