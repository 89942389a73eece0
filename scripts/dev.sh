#!/usr/bin/env bash
# The one run command: installs the servers if needed, then starts the whole
# dev stack (nats-server and secantusd-rs under ./.data, demo data, the service)
# and prints the web page's address with a ready bearer token.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-servers.sh
# shellcheck disable=SC1091
source "${XDG_CACHE_HOME:-$HOME/.cache}/contact-bulk/env"
export CONTACT_BULK_NATS_SERVER CONTACT_BULK_MONGO_SERVER
exec cargo run --release -- dev "$@"
