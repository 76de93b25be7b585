#!/usr/bin/env bash
# Builds the image cairn:local without pulling anything: the release binaries, the shared
# libraries they need, and a few tools the tests use (sh, sleep, tc if the host has it),
# imported as a root filesystem with `docker import`. No registry is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-cairn:local}"

cargo build --release --workspace --locked --quiet

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/data" "$root/tmp" "$root/etc/cairn" "$root/root"
chmod 1777 "$root/tmp"

copy_with_libs() {
  local bin="$1" dest="$2"
  cp -L "$bin" "$root$dest"
  ldd "$bin" | grep -o '/[^ )]*' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

for b in cairn cairn-coordinator cairn-storage-node; do
  copy_with_libs "target/release/$b" "/usr/local/bin/$b"
done
mkdir -p "$root/bin" "$root/sbin"
copy_with_libs "$(command -v sh)" /bin/sh
copy_with_libs "$(command -v sleep)" /bin/sleep
if command -v tc >/dev/null 2>&1; then
  copy_with_libs "$(command -v tc)" /sbin/tc
fi
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
echo 'hosts: files dns' >"$root/etc/nsswitch.conf"

tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/bin:/bin:/sbin' \
  --change 'ENV RUST_LOG=info,openraft=warn' \
  --change 'WORKDIR /data' \
  - "$tag" >/dev/null
echo "built image $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
