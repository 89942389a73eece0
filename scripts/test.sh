#!/usr/bin/env bash
# The one test command: bash scripts/test.sh [args for the test binaries, e.g. a name filter]
#
# On a fresh Debian box with the Rust toolchain it installs what the tests need
# (nats-server and the MongoDB-wire server secantusd-rs via
# scripts/install-servers.sh, cached under ~/.cache/contact-bulk; Debian's
# chromium and chromium-driver for the browser test; nodejs and npm for the
# benchmarks' Node yardsticks), then checks formatting
# and lints and runs every test of the workspace against the real servers.
# TEST_THREADS (default 2, for a 2-core box) sets the test binaries' parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> [%ss] %s\n' "$SECONDS" "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

step "installing servers (scripts/install-servers.sh)"
bash scripts/install-servers.sh
# shellcheck disable=SC1091
source "${XDG_CACHE_HOME:-$HOME/.cache}/contact-bulk/env"
export CONTACT_BULK_NATS_SERVER CONTACT_BULK_MONGO_SERVER
echo "nats-server:  $CONTACT_BULK_NATS_SERVER"
echo "secantusd-rs: $CONTACT_BULK_MONGO_SERVER"

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  step "chromium and chromedriver present"
else
  step "installing chromium and chromium-driver (browser test)"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi
chromium --version 2>/dev/null || true
chromedriver --version

if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  step "node $(node --version) and npm $(npm --version) present"
else
  # The benchmarks' Node yardsticks (tests/bench.rs); their npm packages are
  # installed by the bench itself under ~/.cache/contact-bulk/yardsticks.
  step "installing nodejs and npm (the benchmarks' Node yardsticks)"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends nodejs npm
fi

for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    step "installing the $component component"
    rustup component add "$component"
  fi
done

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace -- --test-threads=${TEST_THREADS:-2} $*"
cargo test --workspace -- --test-threads="${TEST_THREADS:-2}" "$@"

step "all checks passed"
