#!/usr/bin/env bash
# The Linux package as a user gets it: builds the .deb (packaging/linux/build-deb.sh: one release
# build), installs it with dpkg, runs the installed program from a folder outside the source tree
# (--version, an `edit` on the fixture model, the window once under Xvfb), validates the .desktop
# entry, then removes the package and checks that its files are gone. `.ci/run` calls it last;
# it also runs alone (as root, or with sudo): `bash .ci/package.sh [--release]`.
#
# By default it packages the test build (build-deb.sh --profile dev: the binary `cargo test` built,
# so CI spends no release build on it); `--release` packages a release build, as releases are.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
started=$(date +%s)
step() { echo "--- [package +$(($(date +%s) - started))s] $*"; }
profile=dev
case "${1:-}" in
  "") ;;
  --release) profile=release ;;
  *) echo "usage: $0 [--release]" >&2; exit 2 ;;
esac

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { $SUDO apt-get update -q >/dev/null; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null
}
command -v desktop-file-validate >/dev/null || { step "installing desktop-file-utils"; apt_install desktop-file-utils; }
command -v Xvfb >/dev/null || { step "installing Xvfb"; apt_install xvfb; }

step "building the .deb ($profile profile)"
deb="$(packaging/linux/build-deb.sh --profile "$profile" | tail -n 1)"
ls -l "$deb"
dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
dpkg-deb --contents "$deb"
version="$(dpkg-deb --field "$deb" Version)"
# The test build (dev profile; `cargo test` has built it already in CI), whose edits the tests
# compare with diffusers: the installed program must write the very same file.
cargo build --locked --quiet --bin instruct-pix2pix
test_build="$(dirname "$(dirname "$deb")")/debug/instruct-pix2pix"

step "installing it (dpkg -i, then apt-get -f for missing dependencies)"
# A copy left installed by an earlier, interrupted run would hide a broken install.
if dpkg-query -W -f='${Status}' instruct-pix2pix 2>/dev/null | grep -q "ok installed"; then
  $SUDO dpkg -r instruct-pix2pix >/dev/null
fi
if ! $SUDO dpkg -i "$deb"; then
  [ -n "$apt_updated" ] || { $SUDO apt-get update -q >/dev/null; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -f install -y -q --no-install-recommends
fi
dpkg-query -W -f='${Status} ${Version}\n' instruct-pix2pix | grep -q "ok installed ${version}"
installed_files="$(dpkg -L instruct-pix2pix | while read -r f; do [ -f "$f" ] && echo "$f"; done)"
bin_before="$(ls -A /usr/bin)"

# Everything below runs the installed copy in a folder of its own, with copies of the fixtures,
# so that nothing can come from the source tree or the build.
work="$(mktemp -d)"
xvfb_pid=""
cleanup() {
  [ -z "$xvfb_pid" ] || kill "$xvfb_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cp -r tests/fixtures/pipelines/sd1-tiny "$work/model"
cp tests/fixtures/edits/sd1-plain/input.png tests/fixtures/edits/sd1-plain/latents.npy "$work/"
cd "$work"
export HF_HUB_OFFLINE=1 HF_HOME="$work/hf-home" INSTRUCT_PIX2PIX_CONFIG_DIR="$work/config"
mkdir -m 700 "$work/runtime"
export XDG_RUNTIME_DIR="$work/runtime"

step "installed /usr/bin/instruct-pix2pix --version"
/usr/bin/instruct-pix2pix --version | tee version.txt
grep -qx "instruct-pix2pix ${version%-*}" version.txt

step "an edit with the installed program (fixture model sd1-tiny)"
edit_args=(edit --model "$work/model" --image input.png --prompt "make it snowy" --steps 10
  --seed 1 --latents latents.npy --quiet)
/usr/bin/instruct-pix2pix "${edit_args[@]}" --output out.png
"$test_build" "${edit_args[@]}" --output out-test-build.png
cmp out.png out-test-build.png || { echo "the installed program's edit differs from the test build's"; exit 1; }
# A 64×64 PNG that carries the edit's settings (its text chunk names the prompt).
[ "$(head -c 8 out.png | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] || { echo "out.png is not a PNG"; exit 1; }
[ "$(od -An -j16 -N8 -tu1 out.png | tr -s ' ' | sed 's/^ //')" = "0 0 0 64 0 0 0 64" ] || { echo "out.png is not 64x64"; exit 1; }
grep -aq "make it snowy" out.png || { echo "out.png lacks its settings chunk"; exit 1; }
echo "out.png: 64x64 PNG with its settings, byte for byte the test build's"

step "desktop-file-validate"
desktop-file-validate /usr/share/applications/instruct-pix2pix.desktop
grep -q '^Exec=instruct-pix2pix %f$' /usr/share/applications/instruct-pix2pix.desktop
echo "instruct-pix2pix.desktop: valid"
if command -v appstreamcli >/dev/null; then
  appstreamcli validate --no-net /usr/share/metainfo/*instruct*pix2pix*.metainfo.xml
fi
for page in /usr/share/man/man1/instruct-pix2pix*.1.gz; do
  echo "$page: $(zcat "$page" | grep -c '^\.SH') sections"
done

step "the installed window under Xvfb (edit, screenshot, quit)"
display_number=$((150 + $$ % 100))
Xvfb ":$display_number" -screen 0 1400x1000x24 -nolisten tcp >/dev/null 2>&1 &
xvfb_pid=$!
for _ in $(seq 200); do [ -e "/tmp/.X11-unix/X$display_number" ] && break; sleep 0.1; done
DISPLAY=":$display_number" WAYLAND_DISPLAY="" timeout 300 /usr/bin/instruct-pix2pix input.png \
  --model "$work/model" --prompt "make it snowy" --generate \
  --screenshot "$work/window.png" --exit-after-screenshot
[ -s window.png ] || { echo "the window wrote no screenshot"; exit 1; }
mkdir -p "$repo/target/ci-artifacts" && cp window.png "$repo/target/ci-artifacts/installed-window.png"
echo "window.png: $(od -An -j16 -N8 -tu1 window.png | awk '{print $1*16777216+$2*65536+$3*256+$4 "x" $5*16777216+$6*65536+$7*256+$8}')"
# Nothing was written next to the binary, and the installed files are as shipped.
[ "$(ls -A /usr/bin)" = "$bin_before" ] || { echo "files appeared in /usr/bin"; exit 1; }
$SUDO dpkg --verify instruct-pix2pix
echo "settings folder: $(find "$INSTRUCT_PIX2PIX_CONFIG_DIR" -type f 2>/dev/null | tr '\n' ' ')"
kill "$xvfb_pid" 2>/dev/null || true; xvfb_pid=""

step "removing it (dpkg -r)"
cd "$repo"
$SUDO dpkg -r instruct-pix2pix
left=""
while read -r f; do [ -e "$f" ] && left="$left $f"; done <<<"$installed_files"
[ -z "$left" ] || { echo "files left after dpkg -r:$left"; exit 1; }
if dpkg-query -W -f='${Status}' instruct-pix2pix 2>/dev/null | grep -q "ok installed"; then
  echo "instruct-pix2pix is still installed"; exit 1
fi
echo "removed: $(wc -l <<<"$installed_files") files gone"
step "done"
