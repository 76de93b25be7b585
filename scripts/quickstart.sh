#!/usr/bin/env bash
# Builds Cairn, starts a local dev cluster (3 coordinators, 3 storage nodes, R=3), backs up a
# sample directory, restores it elsewhere, verifies it byte for byte and prints what happened.
# Everything lives in a temporary directory that is removed at the end (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building (release)"
cargo build --release --workspace --locked --quiet
bin="$PWD/target/release"

work="$(mktemp -d -t cairn-quickstart.XXXXXX)"
cluster_pid=""
cleanup() {
  if [ -n "$cluster_pid" ] && kill -0 "$cluster_pid" 2>/dev/null; then
    kill -INT "$cluster_pid" 2>/dev/null || true
    wait "$cluster_pid" 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

echo "==> starting a dev cluster in $work/cluster"
XDG_CONFIG_HOME="$work/xdg" "$bin/cairn" dev-cluster --dir "$work/cluster" >"$work/dev-cluster.log" 2>&1 &
cluster_pid=$!
for _ in $(seq 1 600); do
  grep -q "dev cluster ready" "$work/dev-cluster.log" 2>/dev/null && break
  if ! kill -0 "$cluster_pid" 2>/dev/null; then cat "$work/dev-cluster.log"; exit 1; fi
  sleep 0.2
done
grep -q "dev cluster ready" "$work/dev-cluster.log" || { cat "$work/dev-cluster.log"; exit 1; }
head -1 "$work/dev-cluster.log"
export CAIRN_CONFIG="$work/cluster/cairn.toml"

echo "==> making a sample directory"
sample="$work/sample"
mkdir -p "$sample/docs" "$sample/data"
cp -r coordinator storage-node client proto "$sample/docs/"
head -c 20000000 /dev/urandom >"$sample/data/random.bin"
for i in $(seq 1 200); do echo "log line $i of a sample service" >>"$sample/data/service.log"; done
ln -s docs/client "$sample/client-link"
du -sh "$sample" | sed 's/^/    /'

echo "==> backup"
"$bin/cairn" backup "$sample" --tag quickstart
echo "==> second backup (nothing changed)"
"$bin/cairn" backup "$sample" --tag quickstart
echo "==> snapshots"
"$bin/cairn" snapshots
echo "==> restore with verification"
"$bin/cairn" restore latest --target "$work/restore" --verify
diff -r "$sample" "$work/restore$sample" && echo "    restored tree is byte-identical to the original"
echo "==> check --read-data"
"$bin/cairn" check --read-data
echo "==> cluster status"
"$bin/cairn" cluster status
echo "==> done: backup, restore and verification succeeded"
