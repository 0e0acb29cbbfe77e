#!/usr/bin/env bash
# A second Vulkan driver for testing and measuring: Mesa 25.0's lavapipe from Debian 12's
# bookworm-backports suite, unpacked into .drivers/mesa25 beside the system's Mesa 22.3. Nothing is
# installed or replaced system-wide and no root is needed: apt runs on a private sources file, package
# lists and cache in a temporary folder, and only downloads the .debs, which `dpkg -x` unpacks.
# The backports entry copies its URIs: and Signed-By: lines from the machine's own Debian sources at
# run time, so the repository names no mirror.
#
# Idempotent: a second run only rewrites the ICD file and env.sh (for a moved checkout).
# Select the driver with:  . .drivers/mesa25/env.sh   (VK_ICD_FILENAMES and LD_LIBRARY_PATH)
set -euo pipefail
cd "$(dirname "$0")/.."

dest=$PWD/.drivers/mesa25
suite=bookworm-backports
packages=(mesa-vulkan-drivers libdrm2 libdrm-amdgpu1)  # Mesa 25 needs libdrm 2.4.123 from the same suite
want_version=25.0.  # the backport's upstream series (25.0.7-2~bpo12+1 when this was written)

die() { echo "second-driver: $*" >&2; exit 1; }

# the first stanza's URIs:/Signed-By: lines (deb822), or the first `deb` line's URI (one-line format)
backports_entry() {
  local deb822=/etc/apt/sources.list.d/debian.sources one_line=/etc/apt/sources.list uris signed
  if [ -f "$deb822" ]; then
    uris=$(awk 'BEGIN { RS = "" } NR == 1' "$deb822" | grep -m1 '^URIs:' || true)
    signed=$(awk 'BEGIN { RS = "" } NR == 1' "$deb822" | grep -m1 '^Signed-By:' || true)
    [ -n "$uris" ] || die "no URIs: line in the first stanza of $deb822"
  elif [ -f "$one_line" ] && grep -qE '^deb[[:space:]]' "$one_line"; then
    # deb [options] URI suite components...
    uris="URIs: $(grep -m1 -E '^deb[[:space:]]' "$one_line" | sed -E 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' \
                  | awk '{ print $1 }')"
    signed=$(grep -m1 -E '^deb[[:space:]]' "$one_line" | grep -oE 'signed-by=[^] ]+' | sed 's/^signed-by=/Signed-By: /' || true)
  else
    die "found neither $deb822 nor a deb line in $one_line to copy the Debian archive's address from"
  fi
  printf 'Types: deb\n%s\nSuites: %s\nComponents: main\n' "$uris" "$suite"
  [ -z "$signed" ] || printf '%s\n' "$signed"
}

lib=$(find "$dest/root" -name libvulkan_lvp.so -print -quit 2>/dev/null || true)
if [ -z "$lib" ]; then
  # shellcheck disable=SC1091
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ "$codename" = bookworm ] || die "Mesa 25's lavapipe is taken from Debian 12's $suite; this is '${codename:-unknown}'"
  command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "needs apt-get and dpkg"

  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT  # the temporary sources entry, lists and .debs go with it
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/debs"
  backports_entry >"$tmp/backports.sources"
  apt=(apt-get -q -o "Dir::Etc::SourceList=$tmp/backports.sources" -o Dir::Etc::SourceParts=-
       -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o APT::Sandbox::User="$(id -un)")
  "${apt[@]}" update >/dev/null || die "apt-get update of $suite failed (entry: $(tr '\n' ' ' <"$tmp/backports.sources"))"
  (cd "$tmp/debs" && "${apt[@]}" download -t "$suite" "${packages[@]}") >/dev/null \
    || die "apt-get download -t $suite ${packages[*]} failed"

  version=$(dpkg-deb -f "$tmp"/debs/mesa-vulkan-drivers_*.deb Version)
  case $version in "$want_version"*) ;; *) die "$suite has mesa-vulkan-drivers $version, expected $want_version*" ;; esac
  rm -rf "$dest"
  mkdir -p "$dest/root"
  for deb in "$tmp"/debs/*.deb; do dpkg -x "$deb" "$dest/root"; done
  echo "$version" >"$dest/version"
  lib=$(find "$dest/root" -name libvulkan_lvp.so -print -quit)
  [ -n "$lib" ] || die "mesa-vulkan-drivers $version has no libvulkan_lvp.so"
fi
libdir=$(dirname "$lib")

# every dependency must resolve with the unpacked libdrm first (the rest comes from the system)
missing=$(LD_LIBRARY_PATH=$libdir ldd "$lib" | grep 'not found' || true)
[ -z "$missing" ] || die "$lib cannot load:"$'\n'"$missing"

# the package's ICD file names the library by bare name; the loader needs its absolute path here
src_icd=$(find "$dest/root" -name 'lvp_icd*.json' -print -quit)
[ -n "$src_icd" ] || die "no lvp_icd*.json in $dest/root"
sed -E "s|\"library_path\": *\"[^\"]*\"|\"library_path\": \"$lib\"|" "$src_icd" >"$dest/lvp_icd.json"
grep -q "\"library_path\": \"$lib\"" "$dest/lvp_icd.json" || die "could not set library_path in $dest/lvp_icd.json"

cat >"$dest/env.sh" <<EOF
# Mesa $(cat "$dest/version") lavapipe (written by scripts/second-driver.sh): source this file.
export VK_ICD_FILENAMES=$dest/lvp_icd.json
export LD_LIBRARY_PATH=$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF

echo "second-driver: Mesa $(cat "$dest/version") lavapipe in ${dest#"$PWD"/}; select it with:"
echo "  . ${dest#"$PWD"/}/env.sh"
sed -n 's/^export /  export /p' "$dest/env.sh"
