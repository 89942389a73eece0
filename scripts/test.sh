#!/usr/bin/env bash
# The one test command: installs what the tests need on a fresh Debian box
# (nats-server, the MongoDB-wire server, Chromium for the browser test), then
# checks formatting and lints and runs every test against real servers.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo; echo "==> $*"; }

step "installing servers"
bash scripts/install-servers.sh
# shellcheck disable=SC1091
source "${XDG_CACHE_HOME:-$HOME/.cache}/contact-bulk/env"
export CONTACT_BULK_NATS_SERVER CONTACT_BULK_MONGO_SERVER

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  step "installing chromium and chromedriver (browser test)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (both crates, against real servers)"
cargo test --workspace -- --test-threads="${TEST_THREADS:-2}"
