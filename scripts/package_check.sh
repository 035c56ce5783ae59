#!/usr/bin/env bash
# The crate as crates.io would get it: package it, unpack it elsewhere, and build its tests
# there (the fuzz package and other repository-only files are not in it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo package -p coreheap --allow-dirty --no-verify --quiet
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
tar -xzf target/package/coreheap-*.crate -C "$dir"
(cd "$dir"/coreheap-* && CARGO_TARGET_DIR="$dir/target" cargo test --no-run --quiet)
echo "package check: the packaged crate's tests build"
