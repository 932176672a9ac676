#!/usr/bin/env bash
# Builds the Linux package into <target dir>/debian/ and prints its path on the last line:
#
#   packaging/linux/build-deb.sh                  # instruct-pix2pix_<version>-1_amd64.deb (CPU)
#   packaging/linux/build-deb.sh --variant cuda   # instruct-pix2pix-cuda_... (needs nvcc; README)
#   packaging/linux/build-deb.sh --profile dev    # the same package around the test build
#
# 1. the man pages, from the CLI definition (examples/gen_man.rs, built in the package's profile
#    so that it shares that profile's build);
# 2. the third-party licenses of the crates compiled in, with the variant's features
#    (packaging/licenses/generate.sh: cargo-about);
# 3. `cargo deb --strip`: the build (release unless --profile says otherwise), then the package
#    ([package.metadata.deb] in Cargo.toml); stripped, as the profiles keep line tables (release:
#    243 MB with them, 37 MB stripped).
#
# `--profile dev` is what CI packages: the binary `cargo test` has already built (same code,
# dependencies optimised, this crate not), which spares CI's 2 cores a 13-minute release build.
# Releases are built with the release profile (.github/workflows/release.yml). cargo-deb 3.8
# warns that the dev profile "will be a hard error in the future": the version is pinned below.
# cargo-deb (like cargo-about) is installed from crates.io on first use (pinned version).
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_DEB_VERSION=3.8.0

usage="usage: $0 [--variant cuda] [--profile release|dev]"
variant=""
features=""
profile="release"
while [ $# -gt 0 ]; do
  case "$1" in
    --variant)
      variant="${2:?--variant needs a name}"
      [ "$variant" = cuda ] || { echo "unknown variant: $variant (known: cuda)" >&2; exit 2; }
      features="cuda"
      shift 2
      ;;
    --profile)
      profile="${2:?--profile needs a name}"
      case "$profile" in release | dev) ;; *) echo "unknown profile: $profile (release or dev)" >&2; exit 2 ;; esac
      shift 2
      ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
# Cargo's folder for the profile (dev builds into debug/).
profile_dir="$profile"
[ "$profile" = dev ] && profile_dir=debug

if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
  echo "--- installing cargo-deb $CARGO_DEB_VERSION" >&2
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

target_dir="$(cargo metadata --format-version 1 --no-deps --locked |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
# cargo-deb reads these through its "target/release/packaging/..." asset paths, which it points at
# the profile's folder.
staging="$target_dir/$profile_dir/packaging"
rm -rf "$staging"
mkdir -p "$staging/man"

echo "--- man pages (examples/gen_man.rs)" >&2
# With the variant's features and the profile, so that it reuses the package's build.
cargo run --locked --quiet --profile "$profile" ${features:+--features "$features"} \
  --example gen_man -- "$staging/man" >&2
gzip -9nf "$staging"/man/*.1

echo "--- third-party licenses" >&2
packaging/licenses/generate.sh "$staging/THIRD-PARTY-LICENSES.html" "$features"

echo "--- cargo deb${variant:+ --variant $variant}" >&2
# The dev profile's package is CI's install check: cargo-deb's fast compression spares it most of
# a minute of xz (the file is larger; what is in it is the same).
compression=""
[ "$profile" = dev ] && compression="--fast"
cargo deb --strip --profile "$profile" $compression ${variant:+--variant "$variant"} -- --locked >&2
name="instruct-pix2pix${variant:+-$variant}"
version="$(cargo metadata --format-version 1 --no-deps --locked |
  sed -n 's/.*"name":"instruct-pix2pix","version":"\([^"]*\)".*/\1/p')"
deb="$target_dir/debian/${name}_${version}-1_$(dpkg --print-architecture).deb"
[ -f "$deb" ] || { echo "cargo deb did not write $deb" >&2; exit 1; }
echo "$deb"
