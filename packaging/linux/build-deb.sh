#!/usr/bin/env bash
# Builds the Linux package into <target dir>/debian/ and prints its path on the last line:
#
#   packaging/linux/build-deb.sh               # instruct-pix2pix_<version>-1_amd64.deb (CPU)
#   packaging/linux/build-deb.sh --variant cuda  # instruct-pix2pix-cuda_... (needs nvcc; README)
#
# 1. the man pages, from the CLI definition (examples/gen_man.rs, dev profile: after `cargo test`
#    it is already built; GEN_MAN_PROFILE=release builds it in the release profile instead);
# 2. the third-party licenses of the crates compiled in, with the variant's features
#    (packaging/licenses/generate.sh: cargo-about);
# 3. `cargo deb --strip`: the one release build, then the package ([package.metadata.deb] in
#    Cargo.toml); stripped, as the release profile keeps line tables (243 MB with them, 37 MB stripped).
# cargo-deb (like cargo-about) is installed from crates.io on first use (pinned version).
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_DEB_VERSION=3.8.0

variant=""
features=""
case "${1:-}" in
  "") ;;
  --variant)
    variant="${2:?--variant needs a name}"
    [ "$variant" = cuda ] || { echo "unknown variant: $variant (known: cuda)" >&2; exit 2; }
    features="cuda"
    ;;
  *) echo "usage: $0 [--variant cuda]" >&2; exit 2 ;;
esac

if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
  echo "--- installing cargo-deb $CARGO_DEB_VERSION" >&2
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

target_dir="$(cargo metadata --format-version 1 --no-deps --locked |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
# cargo-deb reads these through its "target/release/packaging/..." asset paths.
staging="$target_dir/release/packaging"
rm -rf "$staging"
mkdir -p "$staging/man"

echo "--- man pages (examples/gen_man.rs)" >&2
profile_flag=()
[ "${GEN_MAN_PROFILE:-dev}" = release ] && profile_flag=(--release)
# With the variant's features, so that in the release profile it reuses the package's build.
cargo run --locked --quiet "${profile_flag[@]}" ${features:+--features "$features"} \
  --example gen_man -- "$staging/man" >&2
gzip -9nf "$staging"/man/*.1

echo "--- third-party licenses" >&2
packaging/licenses/generate.sh "$staging/THIRD-PARTY-LICENSES.html" "$features"

echo "--- cargo deb${variant:+ --variant $variant}" >&2
cargo deb --strip ${variant:+--variant "$variant"} -- --locked >&2
name="instruct-pix2pix${variant:+-$variant}"
version="$(cargo metadata --format-version 1 --no-deps --locked |
  sed -n 's/.*"name":"instruct-pix2pix","version":"\([^"]*\)".*/\1/p')"
deb="$target_dir/debian/${name}_${version}-1_$(dpkg --print-architecture).deb"
[ -f "$deb" ] || { echo "cargo deb did not write $deb" >&2; exit 1; }
echo "$deb"
