#!/usr/bin/env bash
# Runs every Sluice test: formatting, lints, unit and property tests, and the lab tests that
# run the real binaries in network namespaces. Needs root (namespaces, TUN devices).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-build
echo "test: cargo fmt --check"
cargo fmt --all --check
echo "test: cargo clippy"
cargo clippy --release --locked --all-targets -- -D warnings
echo "test: cargo build (the sluice binary and the Apple library the C host links, release)"
cargo build --release --locked --workspace
echo "test: cargo test (lab tests run one at a time: each builds a lab of its own)"
cargo test --release --locked --workspace -- --test-threads=1
