#!/usr/bin/env bash
# Builds the OCI image the OCI benchmark pulls: a few hundred MB from Debian packages, in four
# layers (a minbase root, two layers of packages, one layer of deletions: whiteouts and an
# opaque directory), as an OCI image layout at OUT_DIR with the tag `bench`.
#
# Usage (as root, from the repository root): bench/oci-image.sh OUT_DIR
# Needs debootstrap, umoci and apt-get with Debian sources (the Debian package registry is the
# only network it uses). OUT_DIR is rebuilt from scratch.
set -euo pipefail
out=${1:?usage: bench/oci-image.sh OUT_DIR}
for t in debootstrap umoci apt-get dpkg-deb; do
  command -v "$t" >/dev/null || { echo "bench/oci-image.sh needs $t" >&2; exit 1; }
done

# The first Debian mirror of the host's apt sources (deb822 or one-line format).
mirror=$(
  { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
    grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'; } \
  | grep -v security | head -n1 || true
)
[ -n "$mirror" ] || { echo "no Debian mirror in the host's apt sources" >&2; exit 1; }

work=$(mktemp -d /var/tmp/banger-oci-image-XXXXXX)
trap 'rm -rf "$work"' EXIT
rm -rf "$out"
umoci init --layout "$out"
umoci new --image "$out:bench"
# Each layer is the difference between a fresh unpack of the image so far and the changed tree
# (repacking one bundle twice would make every layer hold everything again).
unpack_image() {
  rm -rf "$work/bundle"
  umoci unpack --image "$out:bench" "$work/bundle" >/dev/null
  root=$work/bundle/rootfs
}
unpack_image

echo "layer 1: debootstrap minbase" >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
umoci repack --image "$out:bench" "$work/bundle"

# Packages unpacked without dpkg's database: the benchmark measures file handling, nothing runs.
unpack() {
  mkdir -p "$work/debs"
  (cd "$work/debs" && apt-get download -q "$@" >/dev/null)
  for d in "$work"/debs/*.deb; do dpkg-deb -x "$d" "$root"; done
  rm -rf "$work/debs"
}
echo "layer 2: python3 and perl" >&2
unpack_image
unpack python3.11-minimal libpython3.11-minimal libpython3.11-stdlib perl perl-modules-5.36 libperl5.36
umoci repack --image "$out:bench" "$work/bundle"

echo "layer 3: gcc and icu" >&2
unpack_image
unpack gcc-12 cpp-12 libgcc-12-dev libicu72 binutils-x86-64-linux-gnu
umoci repack --image "$out:bench" "$work/bundle"

echo "layer 4: deletions" >&2
unpack_image
rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/var/cache/apt"
rm -rf "$root/usr/share/locale" && mkdir "$root/usr/share/locale" && echo kept > "$root/usr/share/locale/README"
umoci repack --image "$out:bench" "$work/bundle"
umoci gc --layout "$out"
du -sh "$out" >&2
