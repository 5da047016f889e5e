#!/usr/bin/env bash
# Builds strait and brings up a lab cluster on this machine (3 nodes unless told otherwise).
# Arguments go to `strait lab up`, e.g. `--nodes 5 --name big`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
exec ./target/release/strait lab up "$@"
