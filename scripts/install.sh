#!/usr/bin/env bash
# Installs the `coreheap` runner and the preload library: PREFIX/bin/coreheap and
# PREFIX/lib/libcoreheap_preload.so (PREFIX defaults to ~/.local), where the runner finds
# the library. Usage: bash scripts/install.sh [PREFIX]
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-$HOME/.local}"
cargo build --release --workspace
install -d "$prefix/bin" "$prefix/lib"
install -m 755 target/release/coreheap "$prefix/bin/coreheap"
install -m 755 target/release/coreheap-workloads "$prefix/bin/coreheap-workloads"
install -m 755 target/release/libcoreheap_preload.so "$prefix/lib/libcoreheap_preload.so"
echo "installed $prefix/bin/coreheap and $prefix/lib/libcoreheap_preload.so"
echo "run a program on coreheap: $prefix/bin/coreheap run -- PROGRAM [ARGS...]"
