#!/usr/bin/env bash
# Checks that Cargo.toml's `[profile.dev.package]` list of build-time crates (left unoptimised:
# procedural macros, build scripts and what only they use) is the list that the dependency tree
# gives today, with and without `--features cuda`. A new procedural macro left out of it compiles
# at opt-level 3 (the dependencies' "*" setting) and slows every cold build; a crate that is no
# longer build-time only would run unoptimised in the program. Prints what to add or remove.
set -euo pipefail
cd "$(dirname "$0")/.."

packages() { cargo tree --locked "$@" --prefix none --format '{p}' | awk 'NF { print $1 }' | sort -u; }
build_only() {
  comm -23 <(packages -e normal,build,dev "$@") <(packages -e normal,dev,no-proc-macro "$@")
}
# syn, quote, proc-macro2 and unicode-ident are listed too: zvariant_utils also links them at run
# time (D-Bus signatures), where their speed does not matter.
expected="$( { build_only; build_only --features cuda; printf '%s\n' syn quote proc-macro2 unicode-ident; } | sort -u)"
listed="$(sed -n '/^\[profile\.dev\.package\]$/,/^\[/p' Cargo.toml \
  | sed -n 's/^\([A-Za-z0-9_-]*\) = { opt-level = 0 }$/\1/p' | sort -u)"

missing="$(comm -23 <(echo "$expected") <(echo "$listed"))"
extra="$(comm -13 <(echo "$expected") <(echo "$listed"))"
if [[ -n $missing || -n $extra ]]; then
  echo "Cargo.toml's [profile.dev.package] list of build-time crates is out of date." >&2
  [[ -z $missing ]] || echo "add (build-time only, now compiled at opt-level 3): $(echo $missing)" >&2
  [[ -z $extra ]] || echo "remove (no longer build-time only, or gone): $(echo $extra)" >&2
  exit 1
fi
echo "build-time crates: $(echo "$listed" | wc -l) listed, as the dependency tree says"
