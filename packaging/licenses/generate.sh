#!/usr/bin/env bash
# Writes THIRD-PARTY-LICENSES.html: the license texts of every crate compiled into the program
# for one platform and feature set (cargo-about, offline: from the crates' own files).
#
#   packaging/licenses/generate.sh OUT_FILE [FEATURES]     e.g. ... target/release/packaging/THIRD-PARTY-LICENSES.html cuda
#
# The target is this machine's (rustc's host), as the packages are built natively.
# cargo-about is installed from crates.io on first use (pinned version).
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_ABOUT_VERSION=0.9.3
out="${1:?usage: $0 OUT_FILE [FEATURES]}"
features="${2:-}"

if ! cargo about --version 2>/dev/null | grep -qF "$CARGO_ABOUT_VERSION"; then
  echo "--- installing cargo-about $CARGO_ABOUT_VERSION" >&2
  cargo install cargo-about --locked --features cli --version "$CARGO_ABOUT_VERSION" >&2
fi
host="$(rustc -vV | sed -n 's/^host: //p')"
# `cargo metadata` (which cargo-about reads offline) wants every platform's crates in the local
# registry, not only those a host build downloaded.
cargo fetch --locked --quiet >&2
mkdir -p "$(dirname "$out")"
cargo about generate --locked --offline --fail --target "$host" ${features:+--features "$features"} \
  --config packaging/licenses/about.toml --output-file "$out" packaging/licenses/about.hbs
echo "$out: $(grep -c '<li>' "$out") entries (target $host${features:+, features: $features})" >&2
