#!/usr/bin/env bash
# The one run command: bash scripts/dev.sh [contact-bulk dev options]
#
# Installs the servers if needed (scripts/install-servers.sh, cached under
# ~/.cache/contact-bulk), then starts the whole dev stack with
# `contact-bulk dev`: nats-server and secantusd-rs under ./.data, a demo
# organisation seeded on first run, the service; it prints the web page's
# address with a ready bearer token. Ctrl-C drains and stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-servers.sh
# shellcheck disable=SC1091
source "${XDG_CACHE_HOME:-$HOME/.cache}/contact-bulk/env"
export CONTACT_BULK_NATS_SERVER CONTACT_BULK_MONGO_SERVER

exec cargo run --release -p contact-bulk --bin contact-bulk -- dev "$@"
