#!/usr/bin/env bash
# Builds librocksdb.a once into ~/.cache and prints the two variables that make cargo link it
# instead of compiling RocksDB's 340 C++ files (~25 min on 2 cores) for every profile and for
# check/clippy. Keyed on the locked librocksdb-sys version and features, so a
# version bump builds a new one. Usage: eval "$(scripts/prebuilt-rocksdb.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."
ver=$(awk '/^name = "librocksdb-sys"/{getline; gsub(/"/,"",$3); print $3}' Cargo.lock)
[ -n "$ver" ] || { echo "prebuilt-rocksdb: librocksdb-sys not found in Cargo.lock" >&2; exit 1; }
cache="${TRANSSHIP_CACHE:-$HOME/.cache/transship}"
dir="$cache/rocksdb/${ver}-lz4-zstd-$(uname -m)"
if [ ! -f "$dir/librocksdb.a" ]; then
  echo "prebuilt-rocksdb: building librocksdb-sys $ver once into $dir (about 25 minutes on 2 cores)" >&2
  build_target="$cache/rocksdb-build"
  out=$(env -u ROCKSDB_LIB_DIR -u ROCKSDB_STATIC CARGO_TARGET_DIR="$build_target" \
        cargo build --locked --release -p librocksdb-sys --message-format=json \
      | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "build-script-executed" and "librocksdb-sys" in m["package_id"]:
        print(m["out_dir"])')
  [ -f "$out/librocksdb.a" ] || { echo "prebuilt-rocksdb: no librocksdb.a in '$out'" >&2; exit 1; }
  mkdir -p "$dir.tmp" && cp "$out/librocksdb.a" "$dir.tmp/" && mv "$dir.tmp" "$dir"
  rm -rf "$build_target"
fi
# RocksDB's own debug information is 97 % of the archive (1.5 GB of 1.55 GB) and ends up in
# every binary that links it: 500 MB release binaries, 480 MB per test binary. Nobody steps
# through RocksDB here, so keep its symbols and drop its DWARF, once (a marker says it is done).
if [ ! -f "$dir/.debug-stripped" ]; then
  strip --strip-debug "$dir/librocksdb.a" && touch "$dir/.debug-stripped"
fi
echo "export ROCKSDB_LIB_DIR='$dir' ROCKSDB_STATIC=1"
