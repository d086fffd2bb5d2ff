#!/usr/bin/env bash
# Build popivr's Debian package: installs cargo-deb when missing, builds
# the release binary, generates the man pages from the CLI and runs
# cargo-deb. The result is target/debian/popivr_<version>_<arch>.deb
# (under $CARGO_TARGET_DIR when that is set). Extra arguments go to
# cargo-deb (e.g. --no-strip).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb (cargo install cargo-deb --locked) ..."
    cargo install cargo-deb --locked
fi

target_dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
cargo build --locked --release -p popivr

# Man pages from the CLI the binary parses (popivr::cli), rendered by the
# testkit's popivr-man, compressed as Debian wants them; the asset paths in
# Cargo.toml point here (cargo-deb maps target/release/ to the real target
# directory). The binary itself carries no man page generator.
man_dir="$target_dir/release/man"
rm -rf "$man_dir"
mkdir -p "$man_dir"
cargo run --locked --release --quiet -p popivr-testkit --bin popivr-man -- "$man_dir"
gzip -9n "$man_dir"/*.1

cargo deb --no-build --locked -p popivr "$@"
